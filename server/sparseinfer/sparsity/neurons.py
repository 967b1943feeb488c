"""The active-neuron definition of PAPER.md, in one place so calibration, profiling, predictors, the study and
the engine all agree on it.

Neuron i of a layer is **active** for token x iff ‖n_i(x)‖₂ ≥ ε, where n_i(x) = h_i(x) · W_out[:, i].
Because ‖n_i(x)‖₂ = |h_i(x)| · ‖W_out[:, i]‖₂, the test needs only h and the m column norms of W_out (computed
once), never the (d,)-vector n_i itself. Equality counts as active, so ε = 0 makes every neuron active
(nothing is dropped).
"""

from __future__ import annotations

import torch
from torch import nn


def output_norms(ffn: nn.Module) -> torch.Tensor:
    """‖W_out[:, i]‖₂ for every neuron: (m,) float32, computed in float32 whatever the weight dtype."""
    w = ffn.down_proj.weight.detach()  # (d, m)
    return torch.linalg.vector_norm(w.float(), dim=0)  # (m,)


def output_magnitudes(h: torch.Tensor, norms: torch.Tensor) -> torch.Tensor:
    """‖n_i(x)‖₂ = |h_i| · ‖W_out[:, i]‖₂: (..., m) float32."""
    return h.float().abs() * norms.to(h.device, torch.float32)  # (..., m)


def active_mask(h: torch.Tensor, norms: torch.Tensor, eps: float | torch.Tensor) -> torch.Tensor:
    """Bool (..., m): True where neuron i is active, i.e. |h_i| · ‖W_out[:, i]‖₂ ≥ ε.

    ``eps`` is a scalar (one layer's ε_l) or a tensor broadcastable against h.
    """
    if isinstance(eps, torch.Tensor):
        eps = eps.to(h.device, torch.float32)
    return output_magnitudes(h, norms) >= eps
