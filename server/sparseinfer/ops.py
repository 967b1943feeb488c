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
