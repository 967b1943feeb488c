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


@torch.library.register_fake("sparseinfer::rms_norm")
def _rms_norm_fake(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    torch._check(weight.dim() == 1 and weight.shape[0] == x.shape[-1])
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def decode_attention(
    qkv: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slots: torch.Tensor,
    positions: torch.Tensor,
    num_heads: int,
    scale: float,
) -> torch.Tensor:
    """One decode step's attention, one new token per row. ``qkv`` (B, ..., (H + 2 KVH) hd) holds each row's
    ``num_heads`` query heads, then its keys and values (the stacked q/k/v projection's output). Rotates q
    and k at ``positions`` (rope tables ``cos`` / ``sin`` (P, hd)), writes k and v into ``k_cache`` /
    ``v_cache`` (slots, KVH, max_seq, hd) at ``[slots[b], :, positions[b]]``, and returns softmax(scale q Kᵀ)
    V over each slot's positions up to its own, (B, ..., H hd). slots / positions: int64 (B,) on the CPU."""
    return torch.ops.sparseinfer.decode_attention.default(
        qkv, cos, sin, k_cache, v_cache, slots, positions, num_heads, scale
    )


@torch.library.register_fake("sparseinfer::decode_attention")
def _decode_attention_fake(
    qkv: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slots: torch.Tensor,
    positions: torch.Tensor,
    num_heads: int,
    scale: float,
) -> torch.Tensor:
    kv_heads, head_dim = k_cache.shape[1], k_cache.shape[3]
    torch._check(k_cache.shape == v_cache.shape and qkv.shape[-1] == (num_heads + 2 * kv_heads) * head_dim)
    return torch.empty(*qkv.shape[:-1], num_heads * head_dim, dtype=qkv.dtype, device=qkv.device)


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
    weight_format: str = "none",
) -> torch.Tensor:
    """FFN over only the neurons in ``active`` (int32 ascending): ``down_proj(h ⊙ mask)`` (B, d), x's dtype.

    x (B, d); w_in / w_up / w_out_t (m, d) contiguous (w_up None: non-gated; w_out_t = down_proj.weight.T)
    in x's dtype, or, with a quantized ``weight_format``, uint8 rows of ggml blocks (``quantize``): w_in and
    w_up in that format (plain or interleaved), w_out_t in its plain layout (q8_0 / q4_0);
    row_mask None or bool (B, m); activation relu | relu2 | silu | fatrelu | drelu; threshold: FATReLU's.
    """
    return torch.ops.sparseinfer.sparse_ffn.default(
        x, w_in, w_up, w_out_t, active, row_mask, activation, threshold, weight_format
    )


def linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, weight_format: str = "none"
) -> torch.Tensor:
    """``x @ weight.T + bias``: x (..., d) -> (..., k), fp32 accumulation, at memory bandwidth on the CPU in
    every dtype (torch's own CPU bf16 GEMV is slow without AVX-512 BF16). weight (k, d) contiguous in x's
    dtype, or, with ``weight_format`` q8_0 / q4_0 / q8_0_i8 / q4_0_i8, uint8 rows of ggml blocks
    (``quantize``)."""
    return torch.ops.sparseinfer.linear.default(x, weight, bias, weight_format)


BLOCK = 32  # weights per block of the quantized formats
# ggml's block_q8_0 / block_q4_0, in the plain layout and the interleaved one ("_i8": the same blocks, each
# run of 8 stored for 8-lane dot products; see csrc/cpu/quant.h)
BLOCK_BYTES = {"q8_0": 34, "q4_0": 18, "q8_0_i8": 34, "q4_0_i8": 18}
QUANT_FORMATS = tuple(BLOCK_BYTES)


def quantize(w: torch.Tensor, fmt: str) -> torch.Tensor:
    """(rows, d) float, d % 32 == 0 -> uint8 (rows, d / 32 * block bytes) of ggml's ``fmt`` blocks (q8_0 |
    q4_0, by ggml's reference rounding), plain or interleaved (q8_0_i8 | q4_0_i8)."""
    return torch.ops.sparseinfer.quantize.default(w, fmt)


def dequantize(q: torch.Tensor, fmt: str) -> torch.Tensor:
    """uint8 rows of ``fmt`` blocks -> (rows, d) float32."""
    return torch.ops.sparseinfer.dequantize.default(q, fmt)


def _weight_cols(weight: torch.Tensor, weight_format: str) -> int:
    if weight_format == "none":
        return weight.shape[1]
    return weight.shape[1] // BLOCK_BYTES[weight_format] * BLOCK


@torch.library.register_fake("sparseinfer::linear")
def _linear_fake(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, weight_format: str = "none"
) -> torch.Tensor:
    torch._check(x.dim() >= 1 and weight.dim() == 2 and _weight_cols(weight, weight_format) == x.shape[-1])
    return torch.empty(*x.shape[:-1], weight.shape[0], dtype=x.dtype, device=x.device)


@torch.library.register_fake("sparseinfer::quantize")
def _quantize_fake(w: torch.Tensor, fmt: str) -> torch.Tensor:
    torch._check(w.dim() == 2 and w.shape[1] % BLOCK == 0)
    return torch.empty(w.shape[0], w.shape[1] // BLOCK * BLOCK_BYTES[fmt], dtype=torch.uint8, device=w.device)


@torch.library.register_fake("sparseinfer::dequantize")
def _dequantize_fake(q: torch.Tensor, fmt: str) -> torch.Tensor:
    torch._check(q.dim() == 2 and q.shape[1] % BLOCK_BYTES[fmt] == 0)
    return torch.empty(
        q.shape[0], q.shape[1] // BLOCK_BYTES[fmt] * BLOCK, dtype=torch.float32, device=q.device
    )


@torch.library.register_fake("sparseinfer::select_active")
def _select_active_fake(
    scores: torch.Tensor, threshold: float, top_k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    torch._check(scores.dim() == 2)
    row_mask = torch.empty(scores.shape, dtype=torch.bool, device=scores.device)
    n = torch.library.get_ctx().new_dynamic_size(max=scores.shape[1])  # data-dependent union size
    return row_mask, torch.empty(n, dtype=torch.int32, device=scores.device)


def _check_sparse_ffn_shapes(
    x: torch.Tensor, w_in: torch.Tensor, w_out_t: torch.Tensor, weight_format: str
) -> None:
    torch._check(x.dim() == 2 and w_in.dim() == 2 and _weight_cols(w_in, weight_format) == x.shape[1])
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
    weight_format: str = "none",
) -> torch.Tensor:
    _check_sparse_ffn_shapes(x, w_in, w_out_t, weight_format)
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)
