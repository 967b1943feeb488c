"""The FFN variants of PAPER.md, with the neuron activations h (the paper's h_i) exposed on their own.

Naming: ``gate_proj`` is always the projection the activation σ is applied to, ``up_proj`` exists only in
gated FFNs, ``down_proj.weight`` is W_out with shape (d, m), so column i is neuron i's output direction.

    non-gated (ReLU, ReLU²):        h = σ(gate_proj x)
    gated (SwiGLU, ReGLU, FATReLU): h = σ(gate_proj x) ⊙ up_proj x
    dReLU (TurboSparse, Bamboo):    h = relu(gate_proj x) ⊙ relu(up_proj x)
    FFN(x) = down_proj h = Σ_i h_i W_out[:, i]

Non-gated checkpoints hold either ``gate_proj`` (the paper's SparseLLM relu/relu2 models) or ``up_proj``
(Nemotron-style); the loader maps whichever is there onto ``gate_proj`` so that every variant, and every tool
that hooks it (calibration, predictors, the sparse kernels), finds W_in in the same place.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from sparseinfer.model.config import ModelConfig
from sparseinfer.model.linear import Linear, stacked
from sparseinfer.model.step import ForwardStep


def activation_fn(name: str, threshold: float = 0.0) -> Callable[[torch.Tensor], torch.Tensor]:
    """σ by name (see config.SUPPORTED_ACTIVATIONS); dReLU's σ is plain ReLU applied to both projections."""
    if name == "silu":
        return F.silu
    if name in ("relu", "drelu"):
        return F.relu
    if name == "relu2":
        return lambda z: F.relu(z).square()  # Hugging Face's "relu2" (Primer's squared ReLU)
    if name == "fatrelu":
        return lambda z: F.threshold(z, threshold, 0.0)  # z if z > t else 0
    raise ValueError(f"unknown activation {name!r}")


def hidden(
    act: Callable[[torch.Tensor], torch.Tensor], activation: str, gate: torch.Tensor, up: torch.Tensor | None
) -> torch.Tensor:
    """The neuron activations h from the projections: σ(gate), times ``up`` when gated (ReLU'd first for
    dReLU). The one definition the dense FFN and the engine's tiers share."""
    h = act(gate)
    if up is not None:
        h = h * (F.relu(up) if activation == "drelu" else up)
    return h


class FFN(nn.Module):
    """The dense FFN of decoder layer ``layer``; ``forward(x, step)`` counts every neuron into ``step``."""

    def __init__(self, config: ModelConfig, layer: int = 0) -> None:
        super().__init__()
        self.layer = layer
        d, m, bias = config.hidden_size, config.intermediate_size, config.mlp_bias
        self.gated = config.ffn_gated
        self.activation = config.activation
        self.gate_proj = Linear(d, m, bias=bias)  # W_gate (gated) or W_in (non-gated)
        self.up_proj = Linear(d, m, bias=bias) if self.gated else None
        self.down_proj = Linear(m, d, bias=bias)  # W_out, weight (d, m)
        self.m = m
        self.gate_up_proj: nn.Module | None = None  # set by ``fuse_gate_up``, which then drops both
        self.act = activation_fn(config.activation, config.activation_threshold)

    def fuse_gate_up(self) -> None:
        """Gated: replace gate_proj and up_proj by one projection over their rows stacked
        (``linear.stacked``), for a dense model's decode: in one process, alternate rounds, dense decode of
        the 4-layer 7B shape ran 1.02× as fast (q8_0 and q4_0) on the 2-core SPR. After it nothing can hook
        gate_proj, so the engine fuses only the FFNs no sparse runtime took over."""
        if self.up_proj is None or self.gate_up_proj is not None:
            return
        self.gate_up_proj = stacked((self.gate_proj, self.up_proj))  # (2m, d)
        del self.gate_proj, self.up_proj
        self.up_proj = None

    def neuron_activations(self, x: torch.Tensor) -> torch.Tensor:
        """h for every neuron: (..., d) -> (..., m)."""
        if self.gate_up_proj is not None:
            gate, up = self.gate_up_proj(x).chunk(2, dim=-1)  # (..., m) each
            return hidden(self.act, self.activation, gate, up)
        up = self.up_proj(x) if self.up_proj is not None else None  # (..., m)
        return hidden(self.act, self.activation, self.gate_proj(x), up)  # (..., m)

    def forward(self, x: torch.Tensor, step: ForwardStep | None = None) -> torch.Tensor:
        if step is not None:  # every neuron of every real token; served by the GPU when the model is there
            m = self.m
            step.record_dense(self.layer, m, m if x.device.type == "cuda" else 0, x.shape[1])
        return self.down_proj(self.neuron_activations(x))  # (..., d)
