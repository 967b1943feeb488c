"""Neuron profiling: how often each neuron is active under the calibrated definition (PAPER.md, "Hot
neurons").

frequency[l, i] = (#calibration tokens where |h_i|·‖W_out[:, i]‖₂ ≥ ε_l) / N. Placement keeps the most
frequent ("hot") neurons on the fast device. Skew statistics: for p in 10/20/50%, the share of all activations
of a layer (Σ_i frequency) covered by the ⌈p·m⌉ most frequent neurons; a layer that never fires has no share
(NaN, stored as null). The model figure averages the layers that have one.

Memory: one layer's FFN inputs via ``capture.layerwise_ffn_inputs`` plus a (chunk, m) block of h; the result
is L × m float32.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from sparseinfer.model.transformer import Transformer
from sparseinfer.sparsity.capture import layerwise_ffn_inputs
from sparseinfer.sparsity.neurons import active_mask, output_norms

SKEW_SHARES = (0.1, 0.2, 0.5)


def top_share(frequency: torch.Tensor, share: float) -> float:
    """Share of a layer's activations covered by its ⌈share·m⌉ most frequent neurons (NaN if none fire)."""
    total = float(frequency.double().sum())
    if total == 0.0:
        return float("nan")
    k = max(1, math.ceil(share * frequency.numel() - 1e-9))
    return float(frequency.double().topk(k).values.sum()) / total


def _mean(values: list[float]) -> float:
    kept = [v for v in values if v == v]
    return sum(kept) / len(kept) if kept else float("nan")


@dataclass
class Profile:
    frequency: torch.Tensor  # (L, m) float32
    num_tokens: int

    def skew(self) -> list[dict[str, float]]:
        """Per layer: {"top10": …, "top20": …, "top50": …, "never_active": share of neurons never active}."""
        return [
            {
                **{f"top{round(p * 100)}": top_share(row, p) for p in SKEW_SHARES},
                "never_active": float((row == 0).float().mean()),
            }
            for row in self.frequency
        ]

    def model_skew(self) -> dict[str, float]:
        rows = self.skew()
        return {key: _mean([r[key] for r in rows]) for key in rows[0]}

    def manifest(self, text_sha256: str | None = None) -> dict[str, Any]:
        def clean(d: dict[str, float]) -> dict[str, float | None]:
            return {k: (None if v != v else v) for k, v in d.items()}  # NaN is not JSON

        return {
            "num_tokens": self.num_tokens,
            "text_sha256": text_sha256,
            "mean_frequency": [float(r.mean()) for r in self.frequency],
            "layers": [{"layer": i, **clean(s)} for i, s in enumerate(self.skew())],
            "model": clean(self.model_skew()),
        }

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"profile.frequency": self.frequency.float().contiguous()}


@torch.no_grad()
def layer_frequency(ffn: torch.nn.Module, x: torch.Tensor, eps: float, chunk: int = 2048) -> torch.Tensor:
    """(m,) float32: the share of the rows of x (N, d) on which each neuron is active at ε."""
    norms = output_norms(ffn)
    counts = torch.zeros(norms.numel(), dtype=torch.float64, device=x.device)
    for s in range(0, x.shape[0], chunk):
        counts += active_mask(ffn.neuron_activations(x[s : s + chunk]), norms, eps).sum(0)
    return (counts / max(1, x.shape[0])).float()


@torch.no_grad()
def profile(
    model: Transformer,
    sequences: torch.Tensor,
    thresholds: torch.Tensor,
    chunk: int = 2048,
    capture_chunk: int = 8,
    progress: bool = True,
) -> Profile:
    """Per-layer, per-neuron activation frequency on ``sequences`` (N_seq, T) with thresholds ε_l (L,)."""
    thresholds = torch.as_tensor(thresholds, dtype=torch.float32).flatten()
    if thresholds.numel() != len(model.layers):
        raise ValueError(
            f"thresholds has {thresholds.numel()} entries, the model has {len(model.layers)} layers"
        )
    rows = []
    stream = layerwise_ffn_inputs(model, sequences, chunk=capture_chunk, progress=progress)
    for li, x in stream:  # the capture draws the per-layer progress bar
        rows.append(layer_frequency(model.layers[li].mlp, x, float(thresholds[li]), chunk).cpu())
    return Profile(frequency=torch.stack(rows), num_tokens=sequences.numel())
