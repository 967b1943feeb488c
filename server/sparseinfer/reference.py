"""Pure-PyTorch oracles for every op in ``sparseinfer.ops``: slow, obvious, and what the tests trust."""

import torch

from sparseinfer.model.rope import apply_rope


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Hugging Face's LlamaRMSNorm, step for step: fp32 statistics, round, then scale by the weight."""
    x32 = x.float()
    normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * normed.to(x.dtype)


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
    """One decode step's attention, row by row: Hugging Face's rotary embedding in the dtype, the new key
    and value stored in the caches (in place), then softmax(scale q Kᵀ) V in fp32 over the slot's
    positions 0..positions[b], rounded to qkv's dtype. qkv (B, ..., (H + 2 KVH) hd) -> (B, ..., H hd)."""
    B, (kv_heads, hd) = slots.shape[0], (k_cache.shape[1], k_cache.shape[3])
    rows = qkv.reshape(B, num_heads + 2 * kv_heads, hd)
    q, k, v = rows.split((num_heads, kv_heads, kv_heads), dim=1)
    out = torch.empty(B, num_heads, hd, dtype=qkv.dtype)
    group = num_heads // kv_heads
    for b in range(B):
        slot, pos = int(slots[b]), int(positions[b])
        c, s = cos[pos], sin[pos]  # (hd,)
        k_cache[slot, :, pos] = apply_rope(k[b], c, s)  # the model's rotate-half, in the dtype
        v_cache[slot, :, pos] = v[b]
        keys = k_cache[slot, :, : pos + 1].float().repeat_interleave(group, 0)  # (H, n, hd)
        values = v_cache[slot, :, : pos + 1].float().repeat_interleave(group, 0)
        qr = apply_rope(q[b], c, s).float()  # (H, hd)
        probs = ((keys @ qr[:, :, None])[..., 0] * scale).softmax(-1)  # (H, n)
        out[b] = (probs[:, None, :] @ values)[:, 0].to(qkv.dtype)
    return out.reshape(*qkv.shape[:-1], num_heads * hd)


def select_active(
    scores: torch.Tensor, threshold: float = 0.0, top_k: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Predictor scores (B, m) -> (row_mask bool (B, m), union int32 (n,) ascending).

    ``top_k > 0``: each row keeps its ``top_k`` largest scores, ties to the lower index and NaN counting as
    the largest (a stable descending sort: torch.topk leaves ties unspecified); otherwise a neuron is active
    in a row when its score > ``threshold``. The union lists the neurons active in at least one row.
    """
    if scores.dim() != 2:
        raise ValueError(f"scores must be (B, m), got shape {tuple(scores.shape)}")
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0, got {top_k}")
    B, m = scores.shape
    if top_k > 0:
        k = min(top_k, m)
        idx = scores.float().sort(dim=-1, descending=True, stable=True).indices[:, :k]  # (B, k)
        row_mask = torch.zeros(B, m, dtype=torch.bool, device=scores.device)
        row_mask.scatter_(1, idx, True)
    else:
        row_mask = scores.float() > threshold  # (B, m)
    union = row_mask.any(0).nonzero().flatten().to(torch.int32)  # (n,) ascending
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
    """down_proj(h ⊙ mask) over only the neurons in ``active``, fp32 math, result in x's dtype.

    x (B, d); w_in / w_up / w_out_t (m, d) (w_out_t = down_proj.weight.T, one row per neuron); active int32
    (n,) indices; row_mask None or bool (B, m) zeroing h[b, i] where false. With quantized weights
    (``weight_format`` q8_0 | q4_0): the weights dequantized, and x as its Q8_0 quantization for the gate
    and up dot products (``activations_q8_0``), as the kernels compute them.
    """
    idx = active.long()  # (n,)
    x32 = _dot_operand(x, weight_format)  # (B, d)
    w_in, w_out_t = _weights(w_in, weight_format), _weights(w_out_t, weight_format.removesuffix("_i8"))
    z = x32 @ w_in.index_select(0, idx).float().t()  # (B, n)
    if activation in ("relu", "drelu"):
        h = torch.relu(z)
    elif activation == "relu2":
        h = torch.relu(z).square()
    elif activation == "silu":
        h = torch.nn.functional.silu(z)
    elif activation == "fatrelu":
        h = torch.where(z > threshold, z, torch.zeros_like(z))
    else:
        raise ValueError(f"unknown activation {activation!r}")
    if w_up is not None:
        up = x32 @ _weights(w_up, weight_format).index_select(0, idx).float().t()  # (B, n)
        h = h * (torch.relu(up) if activation == "drelu" else up)
    if row_mask is not None:
        h = h * row_mask.index_select(1, idx).to(h.dtype)  # (B, n)
    return (h @ w_out_t.index_select(0, idx).float()).to(x.dtype)  # (B, d)


def linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, weight_format: str = "none"
) -> torch.Tensor:
    """``x @ weight.T + bias`` in fp32, rounded to x's dtype (quantized weights: dequantized, against x's
    Q8_0 quantization)."""
    y = _dot_operand(x, weight_format) @ _weights(weight, weight_format).float().t()  # (B, k)
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


# ---- ggml's block formats: Q8_0 and Q4_0 (32 weights per block, an fp16 scale) ----

BLOCK = 32


def _round_half_away(v: torch.Tensor) -> torch.Tensor:
    """C's roundf (ties away from zero), exactly: computed in float64, where |v| + 0.5 does not round."""
    v64 = v.double()
    return torch.sign(v64) * torch.floor(v64.abs() + 0.5)


def quantize(w: torch.Tensor, fmt: str) -> torch.Tensor:
    """(rows, d) -> uint8 (rows, d / 32 * block bytes), by ggml's reference quantizers (ggml-quants.c):
    Q8_0: d = amax / 127, q = roundf(x / d); Q4_0: d = max / -8 (max: the value of largest magnitude, the
    first one), q = min(15, (int)(x / d + 8.5)), two 4-bit values per byte (i and i + 16). An ``_i8``
    format is the plain one interleaved (``interleave``)."""
    if fmt.endswith("_i8"):
        base = fmt.removesuffix("_i8")
        return interleave(quantize(w, base), base)
    rows, cols = w.shape
    b = w.float().reshape(rows, cols // BLOCK, BLOCK)  # (rows, nb, 32)
    if fmt == "q8_0":
        d = b.abs().amax(-1, keepdim=True) / 127  # (rows, nb, 1)
        inv = torch.where(d == 0, torch.zeros_like(d), 1 / d)
        q = _round_half_away(b * inv).to(torch.int8).view(torch.uint8)  # (rows, nb, 32)
    elif fmt == "q4_0":
        first = b.abs().argmax(-1, keepdim=True)  # the first index of largest magnitude
        d = b.gather(-1, first) / -8  # (rows, nb, 1)
        inv = torch.where(d == 0, torch.zeros_like(d), 1 / d)
        nib = (b * inv + 8.5).trunc().clamp(0, 15).to(torch.uint8)  # (rows, nb, 32)
        q = nib[..., :16] | (nib[..., 16:] << 4)  # (rows, nb, 16)
    else:
        raise ValueError(f"unknown format {fmt!r}")
    scale = d.to(torch.float16).view(torch.uint8).reshape(rows, cols // BLOCK, 2)
    return torch.cat([scale, q], -1).reshape(rows, -1)


def dequantize(q: torch.Tensor, fmt: str) -> torch.Tensor:
    """uint8 rows of ``fmt`` blocks -> (rows, d) float32: w = d * q (Q4_0: q - 8)."""
    if fmt.endswith("_i8"):
        base = fmt.removesuffix("_i8")
        return dequantize(deinterleave(q, base), base)
    size = {"q8_0": 34, "q4_0": 18}[fmt]
    rows = q.shape[0]
    blocks = q.reshape(rows, -1, size)  # (rows, nb, size)
    d = blocks[..., :2].contiguous().view(torch.float16).float()  # (rows, nb, 1)
    body = blocks[..., 2:]
    if fmt == "q8_0":
        vals = body.contiguous().view(torch.int8).float()  # (rows, nb, 32)
    else:
        vals = torch.cat([body & 15, body >> 4], -1).float() - 8  # (rows, nb, 32)
    return (vals * d).reshape(rows, -1)


def _interleave_map(fmt: str, row_bytes: int) -> torch.Tensor:
    """For each byte of an interleaved row, the index of the plain-row byte it holds: each run of 8 blocks
    as their 8 fp16 scales, then 32-byte chunks, chunk c holding bytes [4c, 4c + 4) of each block's quants
    (block j at 4j); blocks after the last full run unchanged (csrc/cpu/quant.h)."""
    size = {"q8_0": 34, "q4_0": 18}[fmt]
    nblk = row_bytes // size
    src = torch.arange(row_bytes)
    for g in range(nblk // 8):
        base = g * 8 * size
        order = [base + j * size + k for j in range(8) for k in range(2)]  # the 8 scales
        for c in range((size - 2) // 4):
            order += [base + j * size + 2 + 4 * c + i for j in range(8) for i in range(4)]
        src[base : base + 8 * size] = torch.tensor(order)
    return src


def interleave(q: torch.Tensor, fmt: str) -> torch.Tensor:
    """Plain rows of ``fmt`` blocks -> the interleaved layout (the same bytes, moved)."""
    return q[:, _interleave_map(fmt, q.shape[1])]


def deinterleave(q: torch.Tensor, fmt: str) -> torch.Tensor:
    """The interleaved layout -> plain rows of ``fmt`` blocks."""
    out = torch.empty_like(q)
    out[:, _interleave_map(fmt, q.shape[1])] = q
    return out


def activations_q8_0(x: torch.Tensor) -> torch.Tensor:
    """x (B, d) as the kernels see it against quantized weights: each block of 32 quantized to Q8_0 as
    ggml's run-time quantize_row_q8_0 does (q = round(x / (amax / 127)), ties to even) and dequantized with
    the scale rounded to fp16."""
    B, d = x.shape
    b = x.float().reshape(B, d // BLOCK, BLOCK)
    step = b.abs().amax(-1, keepdim=True) / 127
    inv = torch.where(step == 0, torch.zeros_like(step), 1 / step)
    q = torch.round(b * inv)  # ties to even
    return (q * step.to(torch.float16).float()).reshape(B, d)


def _weights(w: torch.Tensor, weight_format: str) -> torch.Tensor:
    return w if weight_format == "none" else dequantize(w, weight_format)


def _dot_operand(x: torch.Tensor, weight_format: str) -> torch.Tensor:
    return x.float() if weight_format == "none" else activations_q8_0(x)
