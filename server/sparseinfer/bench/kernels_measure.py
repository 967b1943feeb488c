"""Measurements behind ``sparseinfer bench kernels`` and ``benchmarks/test_sparse_ffn.py``.

One FFN layer with random weights per (shape, dtype). The gate projection is built as W_in = U·V (rank r,
the predictor's default rank), so the low-rank predictor scores = (x Vᵀ) Uᵀ are exactly the gate
pre-activations: the neurons it keeps are the ones with the largest gates, as a trained predictor would pick.
Per case (sparsity s, batch B) each row keeps its top (1 - s)·m scores; the op runs over the union.

Timed, interleaved in every repeat (a noisy neighbour slows all alike) and reported as medians:
- ``dense``: the torch FFN, F.linear for gate/up/down (+ the activation), the baseline the issue names;
- ``dense_rows``: the same dense FFN through ``ops.linear`` (our row kernels at memory bandwidth): a fairer
  baseline where torch's own CPU bf16 GEMV is slow (torch 2.13 without AVX-512 BF16: a few GB/s);
- ``sparse``: predictor (two ``ops.linear``) + ``ops.select_active`` + ``ops.sparse_ffn``, the fast path;
- ``kernel``: ``ops.sparse_ffn`` alone, for its bandwidth: bytes it must read (the rows of active neurons,
  W_up / W_outᵀ rows only where h can be nonzero, as the kernel skips the others) / time, against the
  machine's bandwidth measured in the same run (a multi-threaded sum over a buffer much larger than caches).
- ``read_same_bytes``: torch summing a contiguous buffer of the kernel's byte count, the same-size yardstick.
Every timed call starts with cold caches (``CacheFlush``): otherwise the few MB a sparse call reads would stay
in the L3 from one repeat to the next and the kernel would seem faster than memory.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from sparseinfer import ops
from sparseinfer.engine.hugepages import to_hugepages
from sparseinfer.sparsity.predictor import default_rank

# The paper matches parameters across variants with m(non-gated) ≈ 1.5 m(gated) (8192 vs 5376 at d 2048).
SHAPES: dict[str, dict[str, Any]] = {
    "llama7b-gated-relu": {"d": 4096, "m": 11008, "gated": True, "activation": "relu"},
    "paper-nongated-relu2": {"d": 4096, "m": 16512, "gated": False, "activation": "relu2"},
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class KernelBenchConfig:
    shapes: tuple[str, ...] = tuple(SHAPES)
    dtypes: tuple[str, ...] = ("float32", "bfloat16")
    sparsities: tuple[float, ...] = (0.0, 0.5, 0.8, 0.9, 0.95)
    batches: tuple[int, ...] = (1, 4, 16)
    # Ascending; the sweep stops at the first density where dense wins (larger ones would only confirm it).
    crossover_densities: tuple[float, ...] = (0.1, 0.25, 0.5, 0.75, 1.0)
    # 3 keeps the default run near 5 minutes on the 2-core development machine (batch 16 dense FFNs take
    # ~0.6 s each there); raise it with --repeats where time allows.
    repeats: int = 3
    threads: int | None = None
    seed: int = 0

    def validate(self) -> None:
        for s in self.shapes:
            if s not in SHAPES:
                raise ValueError(f"--shapes: unknown shape {s!r} (known: {', '.join(SHAPES)})")
        for dt in self.dtypes:
            if dt not in DTYPES:
                raise ValueError(f"--dtypes: unknown dtype {dt!r} (known: {', '.join(DTYPES)})")
        if any(not 0.0 <= s < 1.0 for s in self.sparsities):
            raise ValueError("--sparsities must be in [0, 1)")
        if any(b < 1 for b in self.batches) or self.repeats < 1:
            raise ValueError("--batches and --repeats must be >= 1")


@dataclass
class Layer:
    w_in: torch.Tensor  # (m, d) = U V
    w_up: torch.Tensor | None  # (m, d)
    w_out_t: torch.Tensor  # (m, d), the sparse kernel's layout
    w_down: torch.Tensor  # (d, m), the dense layout (down_proj.weight)
    p_v: torch.Tensor  # (r, d) predictor first projection
    p_u: torch.Tensor  # (m, r) predictor second projection
    activation: str


def build_layer(shape: str, dtype: torch.dtype, seed: int) -> Layer:
    spec = SHAPES[shape]
    d, m = spec["d"], spec["m"]
    ffn_params = (3 if spec["gated"] else 2) * d * m
    r = default_rank(d, m, ffn_params)
    gen = torch.Generator().manual_seed(seed)
    v = torch.randn(r, d, generator=gen) / d**0.5  # (r, d)
    u = torch.randn(m, r, generator=gen) / r**0.5  # (m, r)
    w_in = (u @ v).to(dtype)  # (m, d): rank r, so the predictor is exact
    w_up = (torch.randn(m, d, generator=gen) / d**0.5).to(dtype) if spec["gated"] else None
    w_out_t = (torch.randn(m, d, generator=gen) / m**0.5).to(dtype)  # (m, d)
    # Every weight, the dense baseline's too, in huge pages as the engine places them (engine.hugepages).
    hp = to_hugepages
    return Layer(
        hp(w_in),
        hp(w_up) if w_up is not None else None,
        hp(w_out_t),
        hp(w_out_t.t().contiguous()),
        hp(v.to(dtype)),
        hp(u.to(dtype)),
        spec["activation"],
    )


def _act(z: torch.Tensor, activation: str) -> torch.Tensor:
    return F.relu(z).square() if activation == "relu2" else F.relu(z)


def dense_ffn(layer: Layer, x: torch.Tensor) -> torch.Tensor:
    h = _act(F.linear(x, layer.w_in), layer.activation)  # (B, m)
    if layer.w_up is not None:
        h = h * F.linear(x, layer.w_up)
    return F.linear(h, layer.w_down)  # (B, d)


def dense_ffn_rows(layer: Layer, x: torch.Tensor) -> torch.Tensor:
    h = _act(ops.linear(x, layer.w_in), layer.activation)  # (B, m)
    if layer.w_up is not None:
        h = h * ops.linear(x, layer.w_up)
    return ops.linear(h, layer.w_down)  # (B, d)


def measure_bandwidth(repeats: int = 5, gib: float = 1.0) -> float:
    """Bytes/s of a multi-threaded fp32 sum over a buffer far larger than caches (read-only, like the FFN)."""
    buf = to_hugepages(torch.ones(int(gib * (1 << 30)) // 4, dtype=torch.float32))  # as the weights are
    buf.sum()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        buf.sum()
        times.append(time.perf_counter() - t0)
    return buf.numel() * 4 / statistics.median(times)


def _last_level_cache_bytes() -> int:
    try:
        text = Path("/sys/devices/system/cpu/cpu0/cache/index3/size").read_text().strip()  # e.g. "32768K"
        scale = {"K": 1 << 10, "M": 1 << 20}.get(text[-1], 1)
        return int(text.rstrip("KM")) * scale
    except (OSError, ValueError, IndexError):
        return 64 << 20


class CacheFlush:
    """Evicts the caches before every timed call: the sparse kernel's rows at 90% sparsity (~27 MB for the
    LLaMA shape) fit in a 32 MB L3, so back-to-back calls over the same active set would be served from cache
    and overstate the bandwidth. Reads a buffer of 4x the last-level cache (at least 128 MiB), untimed."""

    def __init__(self) -> None:
        size = max(128 << 20, 4 * _last_level_cache_bytes())
        self._buf = torch.ones(size // 4, dtype=torch.float32)  # (size / 4,)

    def __call__(self) -> None:
        self._buf.sum()


def interleaved_times(
    fns: dict[str, Callable[[], object]],
    repeats: int,
    flush: Callable[[], None] | None = None,
    warmup: bool = True,
) -> dict[str, list[float]]:
    """Seconds of each fn, run round-robin ``repeats`` times (after one untimed warm-up call each when
    ``warmup``); ``flush`` (untimed) runs before every timed call, so each starts with cold caches as a real
    model's layer does."""
    if warmup:
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            if flush is not None:
                flush()
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return times


def interleaved_medians(
    fns: dict[str, Callable[[], object]],
    repeats: int,
    flush: Callable[[], None] | None = None,
    warmup: bool = True,
) -> dict[str, float]:
    """Median seconds of each fn (see ``interleaved_times``)."""
    return {k: statistics.median(v) for k, v in interleaved_times(fns, repeats, flush, warmup).items()}


def kernel_bytes(layer: Layer, x: torch.Tensor, union: torch.Tensor, row_mask: torch.Tensor) -> int:
    """Weight bytes the sparse kernel must read: every active W_in row; W_up / W_outᵀ rows only of neurons
    whose activation is nonzero in some row (the kernel skips the rest)."""
    idx = union.long()
    z = x.float() @ layer.w_in.index_select(0, idx).float().t()  # (B, n)
    g = _act(z, layer.activation) * row_mask.index_select(1, idx)  # (B, n)
    live = int((g != 0).any(0).sum())
    row = layer.w_in.shape[1] * layer.w_in.element_size()
    return row * (idx.numel() + live * (2 if layer.w_up is not None else 1))


def run_case(
    layer: Layer, batch: int, sparsity: float, repeats: int, seed: int, flush: CacheFlush, warmup: bool = True
) -> dict[str, Any]:
    """One (batch, sparsity) case. ``warmup`` False skips the untimed first calls: after the first case of a
    layer and batch they only cost time (buffers exist, and caches are flushed before every call anyway)."""
    m, d = layer.w_in.shape
    dtype = layer.w_in.dtype
    x = torch.randn(batch, d, generator=torch.Generator().manual_seed(seed)).to(dtype)  # (B, d)
    k = max(1, round((1.0 - sparsity) * m))

    def predict() -> tuple[torch.Tensor, torch.Tensor]:
        scores = ops.linear(ops.linear(x, layer.p_v), layer.p_u)  # (B, m)
        return ops.select_active(scores, 0.0, k)

    row_mask, union = predict()

    def sparse() -> None:
        mask, uni = predict()
        ops.sparse_ffn(x, layer.w_in, layer.w_up, layer.w_out_t, uni, mask, layer.activation, 0.0)

    def kernel() -> None:
        ops.sparse_ffn(x, layer.w_in, layer.w_up, layer.w_out_t, union, row_mask, layer.activation, 0.0)

    kb = kernel_bytes(layer, x, union, row_mask)
    # The same number of bytes read contiguously by torch (a sum, cold cache): what memory gives a read of
    # this size, ramp-up and thread start included, to set the kernel's scattered rows against.
    same_bytes = torch.ones(max(1, kb // 4), dtype=torch.float32)  # (kb / 4,)
    fns = {
        "dense": lambda: dense_ffn(layer, x),
        "dense_rows": lambda: dense_ffn_rows(layer, x),
        "sparse": sparse,
        "kernel": kernel,
        "read_same_bytes": lambda: same_bytes.sum(),
    }
    times = interleaved_times(fns, repeats, flush, warmup)
    t = {k: statistics.median(v) for k, v in times.items()}
    # Best (fastest) repeat: on a shared machine the closest estimate of what the code does uncontended.
    best = {k: min(v) for k, v in times.items()}
    n_mats = 3 if layer.w_up is not None else 2
    dense_bytes = n_mats * m * d * layer.w_in.element_size()
    return {
        "batch": batch,
        "sparsity": sparsity,
        "union_density": union.numel() / m,
        "dense_ms": t["dense"] * 1e3,
        "dense_rows_ms": t["dense_rows"] * 1e3,
        "sparse_ms": t["sparse"] * 1e3,
        "kernel_ms": t["kernel"] * 1e3,
        "speedup": t["dense"] / t["sparse"],
        "speedup_vs_rows": t["dense_rows"] / t["sparse"],
        "dense_gbps": dense_bytes / t["dense"] / 1e9,
        "dense_rows_gbps": dense_bytes / t["dense_rows"] / 1e9,
        "kernel_bytes": kb,
        "kernel_gbps": kb / t["kernel"] / 1e9,
        "best_dense_ms": best["dense"] * 1e3,
        "best_sparse_ms": best["sparse"] * 1e3,
        "best_kernel_ms": best["kernel"] * 1e3,
        "best_speedup": best["dense"] / best["sparse"],
        "best_kernel_gbps": kb / best["kernel"] / 1e9,
        "read_same_bytes_ms": t["read_same_bytes"] * 1e3,
        # > 1: the kernel reads its scattered rows faster than torch streams the same bytes contiguously.
        "kernel_vs_read": t["read_same_bytes"] / t["kernel"],
        "best_kernel_vs_read": best["read_same_bytes"] / best["kernel"],
    }


def crossover(
    layer: Layer, batch: int, densities: tuple[float, ...], repeats: int, seed: int, flush: CacheFlush
) -> dict[str, Any]:
    """Kernel time over a union of the given density (every row uses all of it: the neurons with the largest
    predictor score summed over the batch) vs the dense FFN: the lowest density at which dense is at least as
    fast (None: sparse wins over the whole range). Densities must ascend: the sweep stops at that point."""
    m, d = layer.w_in.shape
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, d, generator=gen).to(layer.w_in.dtype)  # (B, d)
    order = F.linear(F.linear(x, layer.p_v), layer.p_u).float().sum(0).argsort(descending=True)  # (m,)
    points = []
    for density in densities:
        n = max(1, round(density * m))
        union = order[:n].sort().values.to(torch.int32)  # (n,)
        fns = {
            "dense": lambda: dense_ffn(layer, x),
            "kernel": lambda u=union: ops.sparse_ffn(
                x, layer.w_in, layer.w_up, layer.w_out_t, u, None, layer.activation, 0.0
            ),
        }
        t = interleaved_medians(fns, repeats, flush, warmup=False)  # the cases warmed these up
        points.append({"density": density, "dense_ms": t["dense"] * 1e3, "kernel_ms": t["kernel"] * 1e3})
        if t["kernel"] >= t["dense"]:
            break
    found = next((p["density"] for p in points if p["kernel_ms"] >= p["dense_ms"]), None)
    return {"batch": batch, "points": points, "crossover_density": found}
