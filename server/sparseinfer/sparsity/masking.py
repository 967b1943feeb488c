"""Oracle truncation: run a model with every inactive neuron (PAPER.md's definition, per-layer ε_l) dropped.

This is the "oracle mask" of the study's perplexity-vs-sparsity curve: what the model computes when exactly
the truly inactive neurons are skipped. It is a forward pre-hook on each layer's ``mlp.down_proj`` that zeroes
h_i where |h_i|·‖W_out[:, i]‖₂ < ε_l, so down_proj sums only the active n_i(x); dropping a neuron and zeroing
its h_i are the same thing because FFN(x) = Σ_i h_i W_out[:, i] (+ a bias, which no neuron owns and is kept).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from sparseinfer.sparsity.neurons import active_mask, output_norms


@dataclass
class TruncationStats:
    """Per-layer counts accumulated while the truncation is active (when ``record=True``)."""

    num_neurons: int
    active: list[int] = field(default_factory=list)  # Σ over tokens of |A_t| per layer
    tokens: list[int] = field(default_factory=list)  # tokens seen per layer

    def layer_sparsity(self) -> list[float]:
        """Share of inactive neurons per layer, averaged over tokens (NaN for a layer that saw no token)."""
        return [
            1.0 - a / (t * self.num_neurons) if t else float("nan")
            for a, t in zip(self.active, self.tokens, strict=True)
        ]

    def sparsity(self) -> float:
        """Model sparsity: the average over layers of the token-averaged layer sparsity."""
        per_layer = [s for s in self.layer_sparsity() if s == s]
        return sum(per_layer) / len(per_layer) if per_layer else float("nan")


@contextmanager
def oracle_truncation(
    model: nn.Module,
    thresholds: Sequence[float] | torch.Tensor,
    record: bool = True,
) -> Iterator[TruncationStats]:
    """Within the block, every forward of ``model`` drops each layer's inactive neurons.

    ``thresholds``: ε_l per layer (L,). Yields a TruncationStats that fills up as forwards run. The hooks are
    removed on exit, also when the block raises.
    """
    layers = model.layers
    eps = torch.as_tensor(thresholds, dtype=torch.float32).flatten()
    if eps.numel() != len(layers):
        raise ValueError(f"thresholds has {eps.numel()} entries, the model has {len(layers)} layers")
    stats = TruncationStats(num_neurons=layers[0].mlp.down_proj.weight.shape[1])
    stats.active = [0] * len(layers)
    stats.tokens = [0] * len(layers)
    handles = []

    def make_hook(li: int, norms: torch.Tensor, e: float) -> Callable[..., tuple[torch.Tensor, ...]]:
        def hook(module: nn.Module, args: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
            h = args[0]  # (..., m)
            keep = active_mask(h, norms, e)  # (..., m)
            if record:
                stats.active[li] += int(keep.sum())
                stats.tokens[li] += h.numel() // h.shape[-1]
            return (h * keep.to(h.dtype),)

        return hook

    try:
        for li, layer in enumerate(layers):
            norms = output_norms(layer.mlp).to(layer.mlp.down_proj.weight.device)
            handles.append(
                layer.mlp.down_proj.register_forward_pre_hook(make_hook(li, norms, float(eps[li])))
            )
        yield stats
    finally:
        for handle in handles:
            handle.remove()
