"""Block-quantized weights for the decoder: ggml's Q8_0 and Q4_0 (``ops.quantize``; csrc/cpu/quant.h).

``--weights`` chooses, for every weight the decoder reads (attention, the FFN, lm_head, the predictors): the
checkpoint's dtype (``checkpoint``), or one of ``QUANT_FORMATS``, quantized at load. The embedding table and
the norms stay as they are (one row of the table is read per token). A projection's weights are kept in the
interleaved layout its dot products read fastest (``_i8``: the same blocks, rows stay rows); the sparse FFN's
W_out^T rows stay plain (its axpy sums whole blocks). Bytes per weight: Q8_0 34/32, Q4_0 18/32.
"""

from __future__ import annotations

import torch
from torch import nn

from sparseinfer import ops

QUANT_FORMATS = ("q8_0", "q4_0")
WEIGHT_FORMATS = ("checkpoint", *QUANT_FORMATS)
BYTES_PER_WEIGHT = {"q8_0": 34 / 32, "q4_0": 18 / 32}


def validate_weights(weights: str) -> str:
    if weights not in WEIGHT_FORMATS:
        raise ValueError(f"--weights must be one of {', '.join(WEIGHT_FORMATS)}, got {weights!r}")
    return weights


def quantizable(w: torch.Tensor) -> bool:
    """Whether a (rows, cols) weight can take a block format: its rows hold whole blocks of 32."""
    return w.dim() == 2 and w.shape[1] % ops.BLOCK == 0


def dot_layout(fmt: str) -> str:
    """The layout of ``fmt`` that dot products read (interleaved runs of 8 blocks)."""
    return f"{fmt}_i8"


def quantize_for_dots(w: torch.Tensor, fmt: str, hugepages: bool = True) -> torch.Tensor:
    """(rows, cols) float -> uint8 rows of ``fmt`` blocks in the dot-product layout, in huge pages."""
    from sparseinfer.engine.hugepages import to_hugepages

    return to_hugepages(ops.quantize(w.detach(), dot_layout(fmt)), hugepages)


class QuantizedLinear(nn.Module):
    """``x @ W.T + b`` with W held as ``fmt`` blocks (a buffer, not a parameter: it is not trained)."""

    def __init__(
        self, weight: torch.Tensor, bias: torch.Tensor | None, fmt: str, hugepages: bool = True
    ) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.fmt = fmt
        self.layout = dot_layout(fmt)  # ops.linear's weight_format of the stored rows
        self.register_buffer("weight", quantize_for_dots(weight, fmt, hugepages), persistent=False)
        self.register_buffer("bias", bias.detach() if bias is not None else None, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.linear(x, self.weight, self.bias, self.layout)  # (..., out)

    @property
    def nbytes(self) -> int:
        return self.weight.numel()


def quantize_linears(model: nn.Module, fmt: str, hugepages: bool = True) -> int:
    """Replace every ``model.linear.Linear`` of ``model`` whose rows hold whole blocks by a
    ``QuantizedLinear`` in ``fmt`` (the float weights are dropped with the module); returns how many."""
    from sparseinfer.model.linear import Linear

    replaced = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, Linear) and quantizable(child.weight):
                setattr(parent, name, QuantizedLinear(child.weight, child.bias, fmt, hugepages))
                replaced += 1
    return replaced
