"""The model's dense projections: torch's ``F.linear``, or our row kernels (``ops.linear``) where those win.

torch's CPU matmul in bf16/fp16 is slow on a CPU without native bf16 matrix instructions (AVX-512 BF16,
AMX); there our row kernels are several times faster at decode batch sizes (figures:
benchmarks/results/kernels.md). On a CPU with them (AMX: oneDNN's bf16 GEMM), torch is slower than our
rows only for the first input rows: a GEMV streams the weights at bandwidth either way, and from a few
rows on torch's tiles reuse each weight across rows where ours re-read it. So the choice is a number,
``rows_up_to``: inputs of at most that many rows go through the row kernels, longer ones through torch.
It is decided once, when the model is loaded (``use_row_kernels``), and kept on the module
(``Linear.rows_up_to``): nothing is looked up per call. The choice is ``"auto"`` (the rule of
``rows_up_to``), ``"torch"`` (0) or ``"rows"`` (every input); the CLI reads it from
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
EVERY_INPUT = 2**31 - 1  # rows_up_to of "rows": no input is too long for the row kernels
# "auto" on a CPU with native bf16 (measured on a 2-core Sapphire Rapids, AMX, 4096 x 4096 .. 11008 x 4096,
# torch time / row-kernel time; benchmarks/results/README.md): bf16 1.11-1.24 at 1-2 rows (0.85 for the
# 4096 x 11008 down projection at 2), 0.62 at 4; fp16 (no AMX-FP16 there: torch converts) 1.05-1.15 at 4,
# 0.92-0.96 at 6.
NATIVE_BF16_ROWS_UP_TO = {torch.bfloat16: 2, torch.float16: 4}


@functools.cache
def _cpu_has_native_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def rows_up_to(choice: str, dtype: torch.dtype = torch.bfloat16) -> int:
    """The most input rows a CPU projection in ``dtype`` sends through ``ops.linear`` under ``choice``."""
    if choice not in DENSE_LINEAR_CHOICES:
        raise ValueError(
            f"dense linear kernel must be one of {', '.join(DENSE_LINEAR_CHOICES)}, got {choice!r}"
        )
    if choice == "torch":
        return 0
    if choice == "rows" or not _cpu_has_native_bf16():
        return EVERY_INPUT
    return NATIVE_BF16_ROWS_UP_TO.get(dtype, EVERY_INPUT)


def linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, rows_up_to: int = 0
) -> torch.Tensor:
    """``x @ weight.T + bias`` for x of shape (..., d_in) -> (..., d_out); through ``ops.linear`` where it
    applies (half-precision CPU inference with a contiguous weight) and x has at most ``rows_up_to`` rows."""
    if (
        x.numel() <= rows_up_to * x.shape[-1]
        and x.device.type == "cpu"
        and x.dtype in _HALF
        and weight.dtype == x.dtype
        and weight.is_contiguous()
        and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
    ):
        return ops.linear(x, weight, bias)  # (..., d_out)
    return F.linear(x, weight, bias)


class Linear(nn.Linear):
    """``nn.Linear`` (same parameters and state-dict keys) computed through ``linear``."""

    rows_up_to = 0  # inputs of at most this many rows through our row kernels (``use_row_kernels``)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias, self.rows_up_to)


def stacked(parts: tuple[Linear, ...]) -> Linear:
    """One ``Linear`` over the rows of ``parts`` stacked (same input, outputs concatenated): one weight stream
    and one kernel call where there were several. Each output row is the same dot product as before; our
    row kernels compute it bit for bit alike, torch's GEMMs up to their blocking. Used for attention's
    q/k/v and a dense FFN's gate and up."""
    weight = torch.cat([p.weight.detach() for p in parts])  # (sum of out_features, d)
    has_bias = parts[0].bias is not None
    fused = Linear(weight.shape[1], weight.shape[0], bias=has_bias, device="meta", dtype=weight.dtype)
    fused.weight = nn.Parameter(weight, requires_grad=False)
    if has_bias:
        fused.bias = nn.Parameter(torch.cat([p.bias.detach() for p in parts]), requires_grad=False)
    fused.rows_up_to = parts[0].rows_up_to
    return fused


def use_row_kernels(model: nn.Module, choice: str) -> int:
    """Decide, once, which kernel every ``Linear`` of ``model`` uses (``choice``: see the module docstring);
    returns the ``rows_up_to`` it chose."""
    up_to = 0
    for module in model.modules():
        if isinstance(module, Linear):
            up_to = module.rows_up_to = rows_up_to(choice, module.weight.dtype)
    return up_to
