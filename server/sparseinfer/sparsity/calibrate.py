"""CETT calibration (PAPER.md): one threshold ε_l per layer from one global CETT target.

For layer l and token x, with D(ε) = {i : |h_i(x)|·‖W_out[:, i]‖₂ < ε} the inactive set,

    CETT_ε(x) = ‖Σ_{i∈D(ε)} n_i(x)‖₂ / ‖Σ_i n_i(x)‖₂,         n_i(x) = h_i(x) · W_out[:, i]

and ε_l is the largest candidate whose token-averaged CETT on the calibration tokens is ≤ the target. The
candidates are 0 followed by ``num_candidates`` quantiles (levels 0, 1/(K-1), …, 1) of the layer's
neuron-output magnitudes |h_i|·‖W_out[:, i]‖ over all (token, neuron) pairs, estimated from a uniform random
subsample of at most ``max_quantile_samples`` pairs when there are more. ε = 0 drops nothing (CETT 0), so a
feasible candidate always exists.

Choices PAPER.md leaves open:
- The denominator is Σ_i n_i(x) = W_out h, i.e. FFN(x) without down_proj's bias (no neuron owns a bias, and
  the paper's FFNs have none). A token whose FFN output is exactly 0 has CETT 0 (nothing to lose).
- Sparsity is the share of (token, neuron) pairs inactive at ε_l (token-averaged per layer).
- Search: binary search over the candidate indices. CETT is monotone in ε whenever dropping more neurons
  cannot shrink the dropped sum, e.g. when every n_i(x) lies in one orthant; in general it is not (the norm of
  a sum can fall when a neuron pointing the other way joins D), but the tail neurons' outputs are small and
  nearly uncorrelated, so the dropped norm grows with |D| in practice. What the search guarantees regardless
  is the boundary property: mean CETT(ε_l) ≤ target < mean CETT(next candidate) (or ε_l is the last
  candidate); when CETT is monotone over the candidates that makes ε_l exactly the largest feasible one.

Memory (N calibration tokens, d hidden, m neurons, L layers, b = bytes of the model dtype):
    model weights
    + 2·N·d·b                    capture: residual stream + one layer's FFN inputs (capture.py)
    + N·m·b                      one layer's h, cached between binary-search steps (when ≤ ``h_cache_bytes``;
                                 otherwise h is recomputed from x at every step, trading time for memory)
    + 4·S + 8·N                  quantile sample (S ≤ max_quantile_samples) + per-token norms
    + 4·m·d + 3·4·c·m            W_out in float32 + one chunk of c tokens (h, mask, output)
  7B (d 4096, m 11008, bf16), N = 2^17: 13.5 GB weights + 2 GiB + 2.7 GiB + 64 MiB + 0.2 GiB ≈ 18.5 GB.
Time: per layer, one pass to compute h, the norms and the sample, then ~log2(K) masked down-projections
(2·N·m·d flops each) for the binary search.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from sparseinfer.model.transformer import Transformer
from sparseinfer.sparsity.capture import layerwise_ffn_inputs
from sparseinfer.sparsity.neurons import output_magnitudes, output_norms

DEFAULT_CETT = 0.2  # PAPER.md: the paper's best trade-off
DEFAULT_CANDIDATES = 1000


def validate_cett_target(cett: float) -> float:
    """The CETT target as a float; ValueError naming ``cett`` unless it is a number in (0, 1)."""
    try:
        value = float(cett)
    except (TypeError, ValueError):
        raise ValueError(f"cett must be a number in (0, 1), got {cett!r}") from None
    if not 0.0 < value < 1.0:  # also rejects NaN
        raise ValueError(f"cett must be in (0, 1) (exclusive), got {cett!r}")
    return value


@dataclass
class LayerCalibration:
    threshold: float  # ε_l
    sparsity: float  # share of (token, neuron) pairs inactive at ε_l
    cett: float  # token-averaged CETT achieved at ε_l
    candidates: torch.Tensor  # (K',) float32 ascending, the candidate thresholds searched
    index: int  # ε_l = candidates[index]
    evaluated: dict[int, float] = field(default_factory=dict)  # candidate index -> mean CETT, for the record


@dataclass
class Calibration:
    thresholds: torch.Tensor  # (L,) float32, ε_l
    sparsity_per_layer: list[float]
    cett_per_layer: list[float]
    cett_target: float
    num_tokens: int
    num_candidates: int

    @property
    def sparsity(self) -> float:
        """Model sparsity: tokens and layers averaged (every layer saw the same tokens)."""
        return sum(self.sparsity_per_layer) / len(self.sparsity_per_layer)

    @property
    def cett(self) -> float:
        return sum(self.cett_per_layer) / len(self.cett_per_layer)

    def manifest(self, text_sha256: str | None = None, seq_len: int | None = None) -> dict[str, Any]:
        """The sidecar's ``calibration`` section manifest."""
        return {
            "cett_target": self.cett_target,
            "text_sha256": text_sha256,
            "num_tokens": self.num_tokens,
            "seq_len": seq_len,
            "num_candidates": self.num_candidates,
            "sparsity": self.sparsity,
            "cett": self.cett,
            "layers": [
                {"layer": i, "threshold": float(e), "sparsity": s, "cett": c}
                for i, (e, s, c) in enumerate(
                    zip(self.thresholds.tolist(), self.sparsity_per_layer, self.cett_per_layer, strict=True)
                )
            ],
        }

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"thresholds": self.thresholds.float().contiguous()}


# ---- the per-token quantities, on tensors ----


def token_cett(h: torch.Tensor, w_out: torch.Tensor, norms: torch.Tensor, eps: float) -> torch.Tensor:
    """CETT_ε(x) for every row of h (c, m): (c,) float32, computed in float32 (w_out is W_out, (d, m))."""
    h = h.float()
    w = w_out.float()
    dropped = h * (output_magnitudes(h, norms) < eps)  # (c, m): h_i on the inactive set D, 0 elsewhere
    num = torch.linalg.vector_norm(dropped @ w.T, dim=-1)  # (c,) ‖Σ_{i∈D} n_i‖
    den = torch.linalg.vector_norm(h @ w.T, dim=-1)  # (c,) ‖Σ_i n_i‖
    return torch.where(den > 0, num / den.clamp_min(torch.finfo(torch.float32).tiny), torch.zeros_like(num))


def mean_cett(h: torch.Tensor, w_out: torch.Tensor, eps: float, chunk: int = 4096) -> tuple[float, float]:
    """(token-averaged CETT, sparsity) of one layer at threshold ``eps``, for h (N, m) and W_out (d, m)."""
    norms = torch.linalg.vector_norm(w_out.float(), dim=0)  # (m,)
    w_t = w_out.float().T.contiguous()  # (m, d)
    full = torch.cat([torch.linalg.vector_norm(c.float() @ w_t, dim=-1) for c in h.split(chunk)])  # (N,)
    return _cett_and_sparsity(lambda: iter(h.split(chunk)), w_t, norms, eps, full)


def _cett_and_sparsity(
    chunks: Any, w_t: torch.Tensor, norms: torch.Tensor, eps: float, full_norms: torch.Tensor
) -> tuple[float, float]:
    """Mean CETT and sparsity over all tokens; ``chunks()`` yields h in row chunks, ``full_norms`` (N,) is
    ‖W_out h‖ per token (computed once per layer, it does not depend on ε)."""
    total_cett, inactive, start = 0.0, 0, 0
    for h in chunks():
        h = h.float()  # (c, m)
        drop = output_magnitudes(h, norms) < eps  # (c, m)
        num = torch.linalg.vector_norm((h * drop) @ w_t, dim=-1)  # (c,)
        den = full_norms[start : start + h.shape[0]]
        total_cett += float(torch.where(den > 0, num / den.clamp_min(1e-38), torch.zeros_like(num)).sum())
        inactive += int(drop.sum())
        start += h.shape[0]
    n = full_norms.numel()
    return total_cett / n, inactive / (n * norms.numel())


# ---- one layer ----


def candidate_thresholds(sample: torch.Tensor, num_candidates: int) -> torch.Tensor:
    """0 followed by the ``num_candidates`` quantiles (levels evenly spaced over [0, 1]) of ``sample``,
    deduplicated and ascending: (K',) float32. Quantile k is the sorted sample's element round(q_k·(S-1))."""
    values = sample.float().flatten().sort().values
    levels = torch.linspace(0, 1, num_candidates, dtype=torch.float64)
    idx = (levels * (values.numel() - 1)).round().long()
    return torch.unique(torch.cat([torch.zeros(1), values[idx]]))  # unique() also sorts


def binary_search(evaluate: Any, num: int, target: float) -> int:
    """Largest index k in [0, num) with evaluate(k) ≤ target, assuming evaluate(0) ≤ target and evaluate
    non-decreasing; without monotonicity the result still satisfies evaluate(k) ≤ target < evaluate(k+1)."""
    lo, hi = 0, num  # invariant: evaluate(lo) ≤ target; hi == num or evaluate(hi) > target
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if evaluate(mid) <= target:
            lo = mid
        else:
            hi = mid
    return lo


@torch.no_grad()
def calibrate_layer(
    ffn: nn.Module,
    x: torch.Tensor,
    cett_target: float,
    num_candidates: int = DEFAULT_CANDIDATES,
    chunk: int = 2048,
    max_quantile_samples: int = 1 << 22,
    h_cache_bytes: int = 4 << 30,
    generator: torch.Generator | None = None,
    progress: bool = False,
    desc: str = "layer",
) -> LayerCalibration:
    """ε for one FFN from its inputs x (N, d)."""
    cett_target = validate_cett_target(cett_target)
    if num_candidates < 2:
        raise ValueError(f"num_candidates must be ≥ 2, got {num_candidates}")
    n, m = x.shape[0], ffn.down_proj.weight.shape[1]
    if n == 0:
        raise ValueError("no calibration tokens")
    generator = generator or torch.Generator().manual_seed(0)
    norms = output_norms(ffn)  # (m,)
    w_t = ffn.down_proj.weight.float().T.contiguous()  # (m, d)
    h_dtype = x.dtype
    cache = None
    if n * m * torch.empty((), dtype=h_dtype).element_size() <= h_cache_bytes:
        cache = torch.empty(n, m, dtype=h_dtype, device=x.device)  # (N, m)

    # Pass 1: h (cached if it fits), ‖W_out h‖ per token, and a uniform sample of the magnitudes.
    rate = min(1.0, max_quantile_samples / (n * m))
    full_norms = torch.empty(n, dtype=torch.float32, device=x.device)  # (N,)
    samples = []
    for s in tqdm(range(0, n, chunk), desc=f"{desc} h", disable=not progress, leave=False):
        h = ffn.neuron_activations(x[s : s + chunk])  # (c, m)
        if cache is not None:
            cache[s : s + chunk] = h
        hf = h.float()
        full_norms[s : s + chunk] = torch.linalg.vector_norm(hf @ w_t, dim=-1)
        mags = output_magnitudes(hf, norms).flatten()  # (c·m,)
        if rate >= 1.0:
            samples.append(mags)
        else:  # with replacement: each pair equally likely, ~rate·c·m draws per chunk
            k = max(1, round(rate * mags.numel()))
            samples.append(mags[torch.randint(0, mags.numel(), (k,), generator=generator).to(mags.device)])
    candidates = candidate_thresholds(torch.cat(samples).cpu(), num_candidates)
    del samples

    def chunks() -> Iterator[torch.Tensor]:
        if cache is not None:
            yield from cache.split(chunk)
        else:  # h did not fit in memory: recompute it from x, chunk by chunk
            for s in range(0, n, chunk):
                yield ffn.neuron_activations(x[s : s + chunk])

    results: dict[int, tuple[float, float]] = {0: (0.0, 0.0)}  # ε = 0 drops nothing
    bar = tqdm(
        total=math.ceil(math.log2(max(2, candidates.numel()))),
        desc=f"{desc} search",
        disable=not progress,
        leave=False,
    )

    def evaluate(k: int) -> float:
        if k not in results:
            results[k] = _cett_and_sparsity(chunks, w_t, norms, float(candidates[k]), full_norms)
            bar.update()
        return results[k][0]

    index = binary_search(evaluate, candidates.numel(), cett_target)
    bar.close()
    cett, sparsity = results[index]
    return LayerCalibration(
        threshold=float(candidates[index]),
        sparsity=sparsity,
        cett=cett,
        candidates=candidates,
        index=index,
        evaluated={k: v[0] for k, v in results.items()},
    )


# ---- the whole model ----


@torch.no_grad()
def calibrate(
    model: Transformer,
    sequences: torch.Tensor,
    cett_target: float = DEFAULT_CETT,
    num_candidates: int = DEFAULT_CANDIDATES,
    chunk: int = 2048,
    capture_chunk: int = 8,
    max_quantile_samples: int = 1 << 22,
    h_cache_bytes: int = 4 << 30,
    seed: int = 0,
    progress: bool = True,
) -> Calibration:
    """Per-layer thresholds ε_l for ``cett_target`` from calibration ``sequences`` (N_seq, T) token ids.

    Layer by layer (``capture.layerwise_ffn_inputs``): never more than one layer's activations in memory.
    ``chunk`` is tokens per matmul chunk, ``capture_chunk`` sequences per decoder-layer chunk.
    """
    cett_target = validate_cett_target(cett_target)
    generator = torch.Generator().manual_seed(seed)
    thresholds, sparsity, cett = [], [], []
    for li, x in layerwise_ffn_inputs(model, sequences, chunk=capture_chunk, progress=progress):
        layer = calibrate_layer(
            model.layers[li].mlp,
            x,
            cett_target,
            num_candidates=num_candidates,
            chunk=chunk,
            max_quantile_samples=max_quantile_samples,
            h_cache_bytes=h_cache_bytes,
            generator=generator,
            progress=progress,
            desc=f"layer {li}",
        )
        thresholds.append(layer.threshold)
        sparsity.append(layer.sparsity)
        cett.append(layer.cett)
    return Calibration(
        thresholds=torch.tensor(thresholds, dtype=torch.float32),
        sparsity_per_layer=sparsity,
        cett_per_layer=cett,
        cett_target=cett_target,
        num_tokens=sequences.numel(),
        num_candidates=num_candidates,
    )
