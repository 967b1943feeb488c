"""The model's dense projections: torch's ``F.linear``, or our row kernels (``ops.linear``) where those win.

torch's CPU matmul in bf16/fp16 is slow on a CPU without native bf16 matrix instructions (AVX-512 BF16,
AMX): measured on the 2-core AVX2 development VM, torch 2.13, batch 16, bf16: a 192 -> 768 projection 394 us
vs 154 us through ``ops.linear``, an 8192 x 192 lm_head 4.06 ms vs 1.05 ms; batch 1, LLaMA-7B's FFN 15.0 ms
vs 9.4 ms. There the half-precision projections of inference (no autograd) run on the row kernels, each
row's result independent of its batch mates. Elsewhere, in fp32, on other devices, or when autograd is
recording, ``F.linear``. ``SPARSEINFER_DENSE_LINEAR=torch|rows`` overrides the choice (default ``auto``).
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from sparseinfer import ops

_HALF = (torch.bfloat16, torch.float16)


@functools.cache
def _cpu_has_native_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def rows_preferred() -> bool:
    """Whether half-precision CPU projections go through ``ops.linear`` (see the module docstring)."""
    choice = os.environ.get("SPARSEINFER_DENSE_LINEAR", "auto").strip().lower()
    if choice not in ("auto", "torch", "rows"):
        raise ValueError(f"SPARSEINFER_DENSE_LINEAR must be auto, torch or rows, got {choice!r}")
    return choice == "rows" or (choice == "auto" and not _cpu_has_native_bf16())


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ weight.T + bias`` for x of shape (..., d_in) -> (..., d_out)."""
    if (
        x.device.type == "cpu"
        and x.dtype in _HALF
        and weight.dtype == x.dtype
        and weight.is_contiguous()
        and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
        and rows_preferred()
    ):
        y = ops.linear(x.reshape(-1, x.shape[-1]), weight, bias)  # (N, d_out)
        return y.view(*x.shape[:-1], weight.shape[0])
    return F.linear(x, weight, bias)


class Linear(nn.Linear):
    """``nn.Linear`` (same parameters and state-dict keys) computed through ``linear``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)
