"""The model's dense projections: torch's ``F.linear``, or our row kernels (``ops.linear``) where those win.

torch's CPU matmul in bf16/fp16 is slow on a CPU without native bf16 matrix instructions (AVX-512 BF16,
AMX); there our row kernels are several times faster at decode batch sizes (figures:
benchmarks/results/kernels.md). Which one a projection uses is decided once, when the model is loaded
(``use_row_kernels``), and kept on the module (``Linear.rows``): nothing is looked up per call. The choice
is ``"auto"`` (the rule of ``row_kernels_win``), ``"torch"`` or ``"rows"``; the CLI reads it from
``$SPARSEINFER_DENSE_LINEAR``. The row kernels only ever run half-precision inference on the CPU: fp32,
other devices and autograd stay on ``F.linear`` whatever the choice.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from sparseinfer import ops

_HALF = (torch.bfloat16, torch.float16)
DENSE_LINEAR_CHOICES = ("auto", "torch", "rows")


@functools.cache
def _cpu_has_native_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def row_kernels_win(choice: str) -> bool:
    """Whether half-precision CPU projections should use ``ops.linear`` under ``choice``."""
    if choice not in DENSE_LINEAR_CHOICES:
        raise ValueError(
            f"dense linear kernel must be one of {', '.join(DENSE_LINEAR_CHOICES)}, got {choice!r}"
        )
    return choice == "rows" or (choice == "auto" and not _cpu_has_native_bf16())


def linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, rows: bool = False
) -> torch.Tensor:
    """``x @ weight.T + bias`` for x of shape (..., d_in) -> (..., d_out); ``rows``: through ``ops.linear``
    where it applies (half-precision CPU inference with a contiguous weight)."""
    if (
        rows
        and x.device.type == "cpu"
        and x.dtype in _HALF
        and weight.dtype == x.dtype
        and weight.is_contiguous()
        and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
    ):
        y = ops.linear(x.reshape(-1, x.shape[-1]), weight, bias)  # (N, d_out)
        return y.view(*x.shape[:-1], weight.shape[0])
    return F.linear(x, weight, bias)


class Linear(nn.Linear):
    """``nn.Linear`` (same parameters and state-dict keys) computed through ``linear``."""

    rows = False  # through our row kernels (set at load by ``use_row_kernels``); torch's by default

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias, self.rows)


def use_row_kernels(model: nn.Module, choice: str) -> bool:
    """Decide, once, which kernel every ``Linear`` of ``model`` uses (``choice``: see the module docstring);
    returns whether it is the row kernels."""
    rows = row_kernels_win(choice)
    for module in model.modules():
        if isinstance(module, Linear):
            module.rows = rows
    return rows
