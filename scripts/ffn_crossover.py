"""Batched FFN on the CPU: the sparse kernel against torch's GEMMs, the study behind ``TieredFFN._gemms_win``
(whose costs an engine now measures at load, ``engine/ffn_calibration.py``; this script times the two paths
over a grid, to check what that calibration predicts).

Run: ``python scripts/ffn_crossover.py`` (about 3 minutes on 2 cores; a quiet machine). LLaMA-7B FFN shapes
(4096 x 11008) in bf16, random weights (the timing does not depend on their values). For n input rows and a
union of ``f * m`` neurons, each row uses ~10.4% of the layer (a predicted set at 90% sparsity), and the
two ways to compute that layer alternate in one process: ``ops.sparse_ffn`` over the union with the row
mask, and the GEMM path the engine would take otherwise (gate and up GEMMs, the mask, the down GEMM). Prints a
Markdown table and the CPU flags.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from sparseinfer import ops
from sparseinfer.bench.machine import cpu_flags, cpu_model
from sparseinfer.engine.hugepages import to_hugepages

D, M, ROW_DENSITY = 4096, 11008, 0.104


def median_times(fns: list[Callable[[], object]], repeats: int) -> list[float]:
    """Median seconds of each fn, the fns taking turns in every round (this VM's speed drifts)."""
    times: list[list[float]] = [[] for _ in fns]
    for fn in fns:
        fn()  # warm-up
    for _ in range(repeats):
        for fn, ts in zip(fns, times, strict=True):
            start = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - start)
    return [statistics.median(ts) for ts in times]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", default="8,16,32", help="batch sizes (comma-separated)")
    parser.add_argument("--unions", default="0.3,0.5,0.7,0.85,1.0", help="union sizes as fractions of m")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    w_in, w_up, w_out_t = (to_hugepages((torch.randn(M, D, generator=g) / 64).bfloat16()) for _ in range(3))
    print(f"{cpu_model()}, {args.threads} threads; flags: {' '.join(cpu_flags())}\n")
    print("| rows | union / m | sparse kernel ms | GEMMs ms | sparse / GEMMs |")
    print("|---:|---:|---:|---:|---:|")
    for n in (int(v) for v in args.rows.split(",")):
        x = torch.randn(n, D, generator=g).bfloat16()
        for f in (float(v) for v in args.unions.split(",")):
            union = torch.randperm(M, generator=g)[: int(f * M)].sort().values.to(torch.int32)
            mask = torch.zeros(n, M, dtype=torch.bool)
            mask[:, union.long()] = torch.rand(n, union.numel(), generator=g) < min(1.0, ROW_DENSITY / f)
            keep = mask.bfloat16()

            def sparse(
                x: torch.Tensor = x, union: torch.Tensor = union, mask: torch.Tensor = mask
            ) -> torch.Tensor:
                return ops.sparse_ffn(x, w_in, w_up, w_out_t, union, mask, "relu", 0.0)

            def gemms(x: torch.Tensor = x, keep: torch.Tensor = keep) -> torch.Tensor:
                h = torch.nn.functional.linear(x, w_in).relu_() * torch.nn.functional.linear(x, w_up)
                return torch.nn.functional.linear(h * keep, w_out_t.t())

            s, t = median_times([sparse, gemms], args.repeats)
            print(f"| {n} | {f:.2f} | {s * 1e3:.1f} | {t * 1e3:.1f} | {s / t:.2f} |", flush=True)


if __name__ == "__main__":
    main()
