"""Typed wrappers over ``torch.ops.sparseinfer.*`` (the compiled extension).

The dispatcher chooses the CPU or CUDA kernel from the tensors' device, so nothing here branches on
the device. Each op also has a fake (meta) implementation so that torch.compile and opcheck can trace
it; ``reference.py`` holds the pure-PyTorch oracle the tests compare against.
"""

import torch

from sparseinfer import _C  # noqa: F401  (loading the library registers the ops)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim: ``weight * x / sqrt(mean(x², -1) + eps)``, fp32 accumulation."""
    return torch.ops.sparseinfer.rms_norm.default(x, weight, eps)


def rms_norm_out(x: torch.Tensor, weight: torch.Tensor, eps: float, out: torch.Tensor) -> torch.Tensor:
    """``rms_norm`` into a caller-owned contiguous buffer (decode reuses one per step)."""
    torch.ops.sparseinfer.rms_norm_out.default(x, weight, eps, out)
    return out


@torch.library.register_fake("sparseinfer::rms_norm")
def _rms_norm_fake(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    torch._check(weight.dim() == 1 and weight.shape[0] == x.shape[-1])
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.register_fake("sparseinfer::rms_norm_out")
def _rms_norm_out_fake(x: torch.Tensor, weight: torch.Tensor, eps: float, out: torch.Tensor) -> None:
    torch._check(weight.dim() == 1 and weight.shape[0] == x.shape[-1])


def select_active(
    scores: torch.Tensor, threshold: float = 0.0, top_k: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Predictor scores (B, m) -> (row_mask bool (B, m), union int32 (n,) ascending unique).

    ``top_k > 0``: each row keeps its ``top_k`` largest scores (ties to the lower index); otherwise a neuron
    is active in a row when its score > ``threshold``.
    """
    row_mask, union = torch.ops.sparseinfer.select_active.default(scores, threshold, top_k)
    return row_mask, union


def sparse_ffn(
    x: torch.Tensor,
    w_in: torch.Tensor,
    w_up: torch.Tensor | None,
    w_out_t: torch.Tensor,
    active: torch.Tensor,
    row_mask: torch.Tensor | None,
    activation: str,
    threshold: float,
) -> torch.Tensor:
    """FFN over only the neurons in ``active`` (int32 ascending): ``down_proj(h ⊙ mask)`` (B, d), x's dtype.

    x (B, d); w_in / w_up / w_out_t (m, d) contiguous (w_up None: non-gated; w_out_t = down_proj.weight.T);
    row_mask None or bool (B, m); activation relu | relu2 | silu | fatrelu | drelu; threshold: FATReLU's.
    """
    return torch.ops.sparseinfer.sparse_ffn.default(
        x, w_in, w_up, w_out_t, active, row_mask, activation, threshold
    )


def sparse_ffn_out(
    x: torch.Tensor,
    w_in: torch.Tensor,
    w_up: torch.Tensor | None,
    w_out_t: torch.Tensor,
    active: torch.Tensor,
    row_mask: torch.Tensor | None,
    activation: str,
    threshold: float,
    out: torch.Tensor,
) -> torch.Tensor:
    """``sparse_ffn`` into a caller-owned contiguous (B, d) buffer of x's dtype (decode reuses one)."""
    torch.ops.sparseinfer.sparse_ffn_out.default(
        x, w_in, w_up, w_out_t, active, row_mask, activation, threshold, out
    )
    return out


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ weight.T + bias`` (B, k), fp32 accumulation; on the CPU at memory bandwidth also in bf16 (torch's
    own CPU bf16 GEMV is slow without AVX-512 BF16), for the predictors' projections. weight contiguous."""
    return torch.ops.sparseinfer.linear.default(x, weight, bias)


@torch.library.register_fake("sparseinfer::linear")
def _linear_fake(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    torch._check(x.dim() == 2 and weight.dim() == 2 and weight.shape[1] == x.shape[1])
    return torch.empty(x.shape[0], weight.shape[0], dtype=x.dtype, device=x.device)


@torch.library.register_fake("sparseinfer::select_active")
def _select_active_fake(
    scores: torch.Tensor, threshold: float, top_k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    torch._check(scores.dim() == 2)
    row_mask = torch.empty(scores.shape, dtype=torch.bool, device=scores.device)
    n = torch.library.get_ctx().new_dynamic_size(max=scores.shape[1])  # data-dependent union size
    return row_mask, torch.empty(n, dtype=torch.int32, device=scores.device)


def _check_sparse_ffn_shapes(x: torch.Tensor, w_in: torch.Tensor, w_out_t: torch.Tensor) -> None:
    torch._check(x.dim() == 2 and w_in.dim() == 2 and w_in.shape[1] == x.shape[1])
    torch._check(w_out_t.shape == w_in.shape)


@torch.library.register_fake("sparseinfer::sparse_ffn")
def _sparse_ffn_fake(
    x: torch.Tensor,
    w_in: torch.Tensor,
    w_up: torch.Tensor | None,
    w_out_t: torch.Tensor,
    active: torch.Tensor,
    row_mask: torch.Tensor | None,
    activation: str,
    threshold: float,
) -> torch.Tensor:
    _check_sparse_ffn_shapes(x, w_in, w_out_t)
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


@torch.library.register_fake("sparseinfer::sparse_ffn_out")
def _sparse_ffn_out_fake(
    x: torch.Tensor,
    w_in: torch.Tensor,
    w_up: torch.Tensor | None,
    w_out_t: torch.Tensor,
    active: torch.Tensor,
    row_mask: torch.Tensor | None,
    activation: str,
    threshold: float,
    out: torch.Tensor,
) -> None:
    _check_sparse_ffn_shapes(x, w_in, w_out_t)
