"""Where a batched CPU FFN step should leave the sparse kernel for torch's GEMMs, measured on this machine.

``TieredFFN._gemms_win`` compares the costs of the two paths (``hybrid.CrossoverCosts``): the sparse kernel's,
per union neuron (its rows read once for all the step's input rows) plus per (row, neuron) pair it computes,
and the GEMMs', per neuron of the layer at the step's number of rows. The sparse kernel costs about the same
on the CPUs measured so far; the GEMMs do not: on 2 Sapphire Rapids cores (AMX) they cost ~1.56 µs per
neuron of a LLaMA-7B layer from 8 to 32 rows, on 2 Zen 4 cores (AVX512_BF16, no AMX) 2.5 µs at 16 rows and
8.3-8.8 at 128, where a prefill's 128 rows at 90% sparsity cost the sparse kernel 4-5 µs. A rule fitted on one
machine sent the other's prefill to the GEMMs at half the speed. So the first load of an FFN shape on a
machine times both on the layer's own CPU tier, and the result is cached (``ffn-crossover.json`` next to
the dense-linear calibration, under the same machine key: ``model.linear_calibration``):

- the sparse kernel over every neuron at 1 input row, and at ``PAIR_ROWS`` rows each with a random
  ``ROW_DENSITY`` of the neurons, as a predicted set is (SiLU, whose gates are never exactly zero, so that
  no pair is skipped): ``per_neuron + per_pair`` per neuron, and ``per_neuron · m + per_pair · pairs``;
- the GEMM path (gate and up, h masked, down: ``TieredFFN._gemms``) at each rung of ``GEMM_ROWS`` above
  the tier's ``rows_up_to`` (below it the step never takes torch).

Each over the whole layer, whose weights (270 MB in bf16 for a 7B shape) stream from DRAM as they do in a
step; the fastest of ``REPEATS`` passes. About 1.5 s for a 7B shape on 2 cores, once per machine.
"""

from __future__ import annotations

import functools
import math
import time
from collections import defaultdict
from collections.abc import Callable

import torch
from torch import nn

from sparseinfer import ops
from sparseinfer.engine.hybrid import CrossoverCosts, TieredFFN
from sparseinfer.engine.sparse_ffn import SparseFFN
from sparseinfer.model.linear_calibration import Calibration, cache_path, shape_key

GEMM_ROWS = (4, 8, 16, 32, 64, 128)  # input rows the GEMM path is timed at
PAIR_ROWS = 128  # input rows of the sparse kernel's second timing
ROW_DENSITY = 0.1  # of the masks timed (a predicted set at 90% sparsity)
REPEATS = 3


@functools.cache
def calibration() -> Calibration:
    """The process's FFN-crossover measurements, on their own cache file."""
    return Calibration(cache_path("ffn-crossover.json"))


def ffn_key(ffn: TieredFFN) -> str | None:
    """The cache entry of ``ffn``'s CPU tier (None: no tier whose steps ``_gemms_win`` decides, or no rung
    of ``GEMM_ROWS`` above its ``rows_up_to`` to time: ``rows`` sets every input's)."""
    t = ffn.cpu_tier()
    if t is None or ffn.rows_up_to >= GEMM_ROWS[-1]:
        return None
    gated = "gated" if t.w_up is not None else "plain"
    return f"ffn:{shape_key(t.w_in)}:{gated}:{ffn.activation}:rows>{ffn.rows_up_to}"


def _best(fn: Callable[[], object]) -> float:
    fn()  # warm: first-call dispatch, oneDNN's primitive cache
    best = math.inf
    for _ in range(REPEATS):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def measure(ffn: TieredFFN) -> dict:
    """The cache entry of ``ffn``: the costs (seconds per neuron and per pair, see the module docstring)."""
    t = ffn.cpu_tier()
    assert t is not None
    g = torch.Generator().manual_seed(0)
    d, m = t.w_in.shape[1], t.size

    def x_of(n: int) -> torch.Tensor:
        return torch.randn(n, d, generator=g).to(t.w_in.dtype)

    def mask_of(n: int) -> torch.Tensor:
        return torch.rand(n, m, generator=g) < ROW_DENSITY

    def sparse(x: torch.Tensor, mask: torch.Tensor | None) -> Callable[[], object]:
        return lambda: ops.sparse_ffn(x, t.w_in, t.w_up, t.w_out_t, t.all_rows, mask, "silu", 0.0)

    def gemms(x: torch.Tensor, keep: torch.Tensor) -> Callable[[], object]:
        return lambda: ffn._gemms(t, x, keep)

    with torch.inference_mode():
        one = _best(sparse(x_of(1), None))  # m neurons, m pairs
        mask = mask_of(PAIR_ROWS)
        pairs = max(int(mask.sum()), m + 1)
        many = _best(sparse(x_of(PAIR_ROWS), mask))  # m neurons, ``pairs`` pairs
        rows = [n for n in GEMM_ROWS if n > ffn.rows_up_to]
        gemm = [_best(gemms(x_of(n), mask_of(n))) / m for n in rows]
    per_pair = max(0.0, (many - one) / (pairs - m))
    return {
        "per_neuron": max(0.0, one / m - per_pair),
        "per_pair": per_pair,
        "gemm_rows": rows,
        "gemm_per_neuron": gemm,
    }


def costs_of(entry: dict) -> CrossoverCosts:
    return CrossoverCosts(
        float(entry["per_neuron"]),
        float(entry["per_pair"]),
        tuple(int(n) for n in entry["gemm_rows"]),
        tuple(float(c) for c in entry["gemm_per_neuron"]),
    )


def _describe(entry: dict) -> str:
    gemms = ", ".join(
        f"{n} rows {c * 1e6:.2f}" for n, c in zip(entry["gemm_rows"], entry["gemm_per_neuron"], strict=True)
    )
    return (
        f"sparse kernel {entry['per_neuron'] * 1e6:.2f} µs per neuron + {entry['per_pair'] * 1e6:.3f} per "
        f"pair; GEMMs per neuron: {gemms} µs"
    )


def calibrate_crossovers(model: nn.Module, cal: Calibration | None = None) -> dict[str, CrossoverCosts]:
    """Set every sparse FFN layer's ``TieredFFN.costs`` from this machine's measurements (layers of one
    shape share one), measuring a shape the first time the machine sees it. Run once the tiers' weights
    are in place and their ``rows_up_to`` decided (``model.linear.use_row_kernels``). Returns the costs by
    ``ffn_key``."""
    cal = cal if cal is not None else calibration()
    groups: dict[str, list[TieredFFN]] = defaultdict(list)
    for module in model.modules():
        if isinstance(module, SparseFFN):
            key = ffn_key(module.tiered)
            if key is not None:
                groups[key].append(module.tiered)
    chosen = {}
    for key, ffns in groups.items():
        costs = costs_of(cal.measured(key, lambda f=ffns[0]: measure(f), _describe))
        for ffn in ffns:
            ffn.costs = costs
        chosen[key] = costs
    return chosen
