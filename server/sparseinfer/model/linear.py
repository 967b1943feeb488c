"""The model's dense projections: torch's ``F.linear``, or our row kernels (``ops.linear``) where those win.

Which wins depends on the machine and on the number of input rows. torch's CPU bf16/fp16 matmul is slow on
a CPU without native bf16 matrix instructions, and even with AVX512_BF16 its batch-1 GEMV streams weights
well below bandwidth, where our row kernels reach it; from a few rows on, a CPU with native bf16 (oneDNN's
AMX or AVX512_BF16 GEMMs) reuses each weight across rows in its tiles where ours re-read it. So the choice
is a number per weight shape, ``rows_up_to``: inputs of at most that many rows go through the row kernels,
longer ones through torch. It is measured, not guessed from CPU flags: ``linear_calibration`` times both on
the model's weights the first time a machine loads a shape, and caches the result. It is decided once,
when the model is loaded (``use_row_kernels``), and kept on each module (``Linear.rows_up_to``): nothing is
looked up per call. The choice is ``"auto"`` (calibrated), ``"torch"`` (0), ``"rows"`` (every input) or a
number of rows for every shape; the CLI reads it from ``$SPARSEINFER_DENSE_LINEAR``. The row kernels only
ever run half-precision inference on the CPU: fp32, other devices and autograd stay on ``F.linear`` whatever
the choice.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from sparseinfer import ops
from sparseinfer.model.linear_calibration import EVERY_INPUT, calibration, shape_key

_HALF = (torch.bfloat16, torch.float16)
DENSE_LINEAR_CHOICES = ("auto", "torch", "rows")  # or a number of rows


def check_choice(choice: str) -> str:
    """``choice`` if it is one of ``DENSE_LINEAR_CHOICES`` or a number of rows ≥ 0; else ValueError."""
    if choice in DENSE_LINEAR_CHOICES or (choice.isdigit() and int(choice) < EVERY_INPUT):
        return choice
    raise ValueError(
        f"dense linear kernel must be one of {', '.join(DENSE_LINEAR_CHOICES)} or a number of rows, "
        f"got {choice!r}"
    )


def rows_up_to(choice: str, weights: Sequence[torch.Tensor]) -> int:
    """The most input rows a projection over any of ``weights`` (one shape and dtype) sends through
    ``ops.linear`` under ``choice``; ``"auto"`` calibrates CPU half-precision weights
    (``linear_calibration``)."""
    check_choice(choice)
    if choice == "torch":
        return 0
    if choice == "rows":
        return EVERY_INPUT
    if choice.isdigit():
        return int(choice)
    w = weights[0]
    if w.device.type != "cpu" or w.dtype not in _HALF or w.dim() != 2 or not w.is_contiguous():
        return 0  # ``linear`` takes torch for these whatever the number
    return calibration().rows_up_to(weights)


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


Assign = Callable[[int], None]


def projection_sites(model: nn.Module) -> Iterator[tuple[torch.Tensor, Assign]]:
    """Every weight of ``model`` whose kernel ``rows_up_to`` decides, with how to set it: each ``Linear``'s,
    and those of any module that lists its own (``dense_projections()``: the sparse runtime's FFN tiers and
    predictors)."""
    for module in model.modules():
        if isinstance(module, Linear):
            yield module.weight, lambda up_to, m=module: setattr(m, "rows_up_to", up_to)
        elif hasattr(module, "dense_projections"):
            yield from module.dense_projections()


def use_row_kernels(model: nn.Module, choice: str) -> dict[str, int]:
    """Decide, once, which kernel every projection of ``model`` uses (``choice``: see the module
    docstring); weights of one shape and dtype are calibrated together (one per layer: see
    ``linear_calibration``). Returns ``rows_up_to`` per shape (``linear_calibration.shape_key``)."""
    check_choice(choice)
    groups: dict[str, list[tuple[torch.Tensor, Assign]]] = defaultdict(list)
    for weight, assign in projection_sites(model):
        groups[f"{weight.device.type}:{shape_key(weight)}"].append((weight, assign))
    chosen = {}
    for key, sites in groups.items():
        up_to = rows_up_to(choice, [w for w, _ in sites])
        for _, assign in sites:
            assign(up_to)
        chosen[key] = up_to
    return chosen
