"""Pure-PyTorch oracles for every op in ``sparseinfer.ops``: slow, obvious, and what the tests trust."""

import torch


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Hugging Face's LlamaRMSNorm, step for step: fp32 statistics, round, then scale by the weight."""
    x32 = x.float()
    normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * normed.to(x.dtype)
