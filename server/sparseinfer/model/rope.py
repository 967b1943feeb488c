"""Rotary position embeddings: inverse frequencies (default, linear, llama3), cos/sin tables, and application.

The inverse frequencies reproduce transformers' ``ROPE_INIT_FUNCTIONS`` bit for bit (same fp32 operations in
the same order), and tables are computed in fp32 and only then cast to the model dtype, as transformers does,
so our logits match a Hugging Face model's. We use the rotate-half convention (first half of each head pairs
with the second half), which is the layout Hugging Face checkpoints' q/k projections are permuted into.
"""

from __future__ import annotations

import math

import torch

from sparseinfer.model.config import RopeConfig


def inverse_frequencies(rope: RopeConfig, head_dim: int) -> torch.Tensor:
    """(head_dim // 2,) fp32 angular frequency of each rotated pair."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).to(torch.float) / head_dim
    inv_freq = 1.0 / (rope.theta**exponents)  # (hd/2,)
    if rope.rope_type == "linear":
        # Position interpolation: dividing frequencies by `factor` == dividing positions by it.
        return inv_freq / rope.factor
    if rope.rope_type == "llama3":
        return _llama3_scale(inv_freq, rope)
    return inv_freq


def _llama3_scale(inv_freq: torch.Tensor, rope: RopeConfig) -> torch.Tensor:
    # Llama 3.1: long wavelengths (low frequencies) are slowed down by `factor`, short ones kept, and the band
    # in between interpolated smoothly, so that local attention patterns survive context extension.
    assert rope.original_max_position_embeddings is not None
    old_ctx = rope.original_max_position_embeddings
    low_freq_wavelen = old_ctx / rope.low_freq_factor
    high_freq_wavelen = old_ctx / rope.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / rope.factor, inv_freq)
    smooth = (old_ctx / wavelen - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor)
    smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def rope_tables(
    inv_freq: torch.Tensor, num_positions: int, dtype: torch.dtype, device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin, each (num_positions, head_dim) in ``dtype``; row p is position p."""
    positions = torch.arange(num_positions, device=device, dtype=torch.float)  # exact below 2**24
    freqs = positions[:, None] * inv_freq.to(device)[None, :]  # (P, hd/2)
    angles = torch.cat((freqs, freqs), dim=-1)  # (P, hd): both halves of a head share a frequency
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` (B, H, T, hd) by per-position ``cos``/``sin`` (B, 1, T, hd) or (1, 1, T, hd)."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)  # rotate_half
    return x * cos + rotated * sin
