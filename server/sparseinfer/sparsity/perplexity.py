"""Perplexity of a model on token sequences, and the predicted-mask execution the study measures it under.

``perplexity`` is exp of the mean next-token negative log-likelihood over every predicted position of every
sequence: a sequence of T tokens contributes T - 1 predictions (token t+1 from tokens ≤ t), no BOS handling,
no striding, no KV cache (a plain causal pass per batch, which is what the truncation hooks expect: one FFN
call per layer sees every position at once). With equal-length sequences this equals Hugging Face's
``exp(model(tokens, labels=tokens).loss)`` over the same batch.

``predicted_truncation`` runs the model as the sparse server will: each FFN computes only the neurons its
layer's predictor marks active (score ≥ the layer's score threshold), the others' h is zeroed before
``down_proj``.
It mirrors ``masking.oracle_truncation`` (same hook points, same counting) with the predictor in place of the
calibrated thresholds.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from sparseinfer.model import Transformer


@torch.no_grad()
def perplexity(
    model: Transformer, sequences: torch.Tensor, batch_size: int = 8, progress: bool = True, desc: str = "ppl"
) -> float:
    """exp(mean NLL of token t+1 given tokens ≤ t) over all sequences (N, T), T ≥ 2; float32 logits."""
    if sequences.dim() != 2 or sequences.shape[1] < 2:
        raise ValueError(f"sequences must be (N, T) with T >= 2, got shape {tuple(sequences.shape)}")
    if sequences.shape[0] == 0:
        raise ValueError("sequences is empty: no tokens to score")
    if batch_size <= 0:
        raise ValueError(f"batch_size must be > 0, got {batch_size}")
    total_nll, count = 0.0, 0
    starts = range(0, sequences.shape[0], batch_size)
    for s in tqdm(starts, desc=desc, unit="batch", disable=not progress, leave=False):
        batch = sequences[s : s + batch_size].to(model.device)  # (B, T)
        logits = model(batch)  # (B, T, V) float32
        nll = F.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum"
        )
        # Accumulate in float64 on the host: 2^17 tokens of summed NLL lose digits in float32.
        total_nll += float(nll.double())
        count += batch[:, 1:].numel()
    return math.exp(total_nll / count)


class PredictorLike(Protocol):
    """What ``predicted_truncation`` needs from a predictor set (``predictor.PredictorSet`` satisfies it)."""

    def __len__(self) -> int: ...

    def predict(self, layer: int, x: torch.Tensor) -> torch.Tensor: ...


@dataclass
class MaskCounts:
    """Per-layer counts gathered during a truncated run: kept (predicted-active) neurons and tokens seen."""

    active: list[int] = field(default_factory=list)  # Σ over tokens of the number of kept neurons
    tokens: list[int] = field(default_factory=list)
    neurons: list[int] = field(default_factory=list)  # m of each layer

    def layer_sparsity(self) -> list[float]:
        """Per layer: share of (token, neuron) pairs dropped."""
        return [
            1.0 - a / (t * m) if t else float("nan")
            for a, t, m in zip(self.active, self.tokens, self.neurons, strict=True)
        ]


@contextmanager
def predicted_truncation(model: Transformer, predictor_set: PredictorLike) -> Iterator[MaskCounts]:
    """Inside the block, every FFN drops the neurons its predictor marks inactive (h zeroed before W_out).

    Two forward pre-hooks per layer: one on ``mlp`` keeps the FFN input x (the predictor's input), one on
    ``mlp.down_proj`` multiplies h by the predicted mask. Yields the ``MaskCounts`` it fills.
    """
    if len(predictor_set) != len(model.layers):
        raise ValueError(
            f"predictor set has {len(predictor_set)} layers, the model {len(model.layers)}: another model?"
        )
    counts = MaskCounts(
        active=[0] * len(model.layers),
        tokens=[0] * len(model.layers),
        neurons=[layer.mlp.down_proj.in_features for layer in model.layers],
    )
    handles = []

    def make_hooks(index: int) -> tuple[Callable[..., None], Callable[..., tuple]]:
        captured: dict[str, torch.Tensor] = {}

        def grab_input(module: nn.Module, args: tuple) -> None:
            captured["x"] = args[0]

        def drop_inactive(module: nn.Module, args: tuple) -> tuple:
            h = args[0]  # (..., m)
            keep = predictor_set.predict(index, captured.pop("x")).to(h.device)  # (..., m) bool
            counts.active[index] += int(keep.sum())
            counts.tokens[index] += keep[..., 0].numel()
            return (h * keep.to(h.dtype),)

        return grab_input, drop_inactive

    try:
        for i, layer in enumerate(model.layers):
            grab, drop = make_hooks(i)
            handles.append(layer.mlp.register_forward_pre_hook(grab))
            handles.append(layer.mlp.down_proj.register_forward_pre_hook(drop))
        yield counts
    finally:
        for handle in handles:
            handle.remove()
