"""The Llama-family decoder: embeddings, N × (attention + FFN, pre-RMSNorm residual), final norm, lm_head.

Module and parameter names mirror Hugging Face's (``layers.3.self_attn.q_proj.weight`` is a checkpoint's
``model.layers.3.self_attn.q_proj.weight``) so that loading is a rename of the prefix, nothing more.

``forward`` runs three ways:
- no cache: a plain causal pass from position 0 (perplexity, calibration);
- with a cache, prefill or decode: row b of ``tokens`` continues the sequence in cache slot ``slots[b]`` from
  its own current length, so one decode step can batch sequences of different lengths. New keys/values are
  written into the cache, each row attends over its own prefix plus its new tokens, and the cache lengths
  advance by T. A batch of prompts of different lengths runs right-padded to the longest: ``lengths`` gives
  each row's real token count, the logits are taken at each row's last real token and each slot advances by
  its own length, so the padding's keys/values sit past the slot's length and are masked out (and then
  overwritten) like any stale entry.

The decode hot path avoids per-step allocation where it can: rope tables are precomputed (and only grown),
the cache is read through a slice up to the longest live row (a view when the slots are contiguous), and no
mask is built when every row is at the same position and T == 1. On the CPU a decode step (T == 1) runs each
layer's rope, cache write and attention as one op, ``ops.decode_attention`` (in torch ops they took ~260 µs
per layer of a q4_0 step on the 2-core SPR, as one op ~110 µs: benchmarks/results/README.md); each row
attends over its own positions, so rows of different lengths need no mask there either.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from sparseinfer import ops
from sparseinfer.model.config import ModelConfig
from sparseinfer.model.ffn import FFN
from sparseinfer.model.kv_cache import KVCache
from sparseinfer.model.linear import Linear, stacked
from sparseinfer.model.rope import apply_rope, inverse_frequencies, rope_tables
from sparseinfer.model.step import ForwardStep


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.rms_norm(x, self.weight, self.eps)  # HF LlamaRMSNorm, fp32 statistics


@dataclass
class _CpuDecode:
    """What ``ops.decode_attention`` needs of a CPU decode step (one new token per row)."""

    cos: torch.Tensor  # (P, hd) the whole rope tables: the op picks each row's position
    sin: torch.Tensor
    slots: torch.Tensor  # (B,) int64
    positions: torch.Tensor  # (B,) int64, each row's new position (its length before the step)


@dataclass
class _Attend:
    """Per-forward attention bookkeeping, computed once and shared by every layer."""

    window: int  # keys to attend over: the longest row's length after this step
    mask: torch.Tensor | None  # (B, 1, T, window) bool, True = attend; None when not needed
    is_causal: bool  # plain causal mask (only valid when every row starts at position 0)
    slot_slice: slice | None  # the slots as a contiguous range, so the cache is read through a view
    slots: torch.Tensor | None  # (B,) on the model device
    start: int | None  # the common start position when all rows share it
    positions: torch.Tensor | None  # (B, T) on the model device, when rows start at different positions
    # Right-padded fresh prompts: (real length n, the rows of that length (b_n,) on the model device), once
    # per forward for every layer. Rows of each length attend on their own, so a row gets bit for bit what
    # it gets prefilled alone (over the padded length the CPU attention kernel blocks and rounds
    # differently).
    length_groups: list[tuple[int, torch.Tensor]] | None = None
    cpu_decode: _CpuDecode | None = None  # set: the layers attend through ops.decode_attention

    def write(self, buf: torch.Tensor, new: torch.Tensor) -> None:
        """Store ``new`` (B, KVH, T, hd) at each row's positions of cache buffer ``buf``."""
        if self.slot_slice is not None and self.start is not None:
            buf[self.slot_slice, :, self.start : self.start + new.shape[2]].copy_(new)
        else:
            # Index tensors (B,1) and (B,T) around a slice broadcast to (B,T) and go first: (B, T, KVH, hd).
            buf[self.slots[:, None], :, self.positions] = new.transpose(1, 2)

    def read(self, buf: torch.Tensor) -> torch.Tensor:
        """(B, KVH, window, hd): each row's cached keys or values up to the longest live row."""
        if self.slot_slice is not None:
            return buf[self.slot_slice, :, : self.window]  # a view: no copy
        return buf[self.slots, :, : self.window]


def causal_attend(T: int) -> _Attend:
    """The attention bookkeeping of a cache-less causal pass over T tokens from position 0."""
    return _Attend(window=T, mask=None, is_causal=T > 1, slot_slice=None, slots=None, start=0, positions=None)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        d, hd, bias = config.hidden_size, config.head_dim, config.attention_bias
        self.num_heads, self.num_kv_heads, self.head_dim = config.num_heads, config.num_kv_heads, hd
        self.q_proj = Linear(d, self.num_heads * hd, bias=bias)
        self.k_proj = Linear(d, self.num_kv_heads * hd, bias=bias)
        self.v_proj = Linear(d, self.num_kv_heads * hd, bias=bias)
        self.o_proj = Linear(self.num_heads * hd, d, bias=bias)
        self.qkv_proj: nn.Module | None = None  # set by ``fuse_qkv``, which then drops q/k/v_proj

    def fuse_qkv(self) -> None:
        """Replace q_proj, k_proj and v_proj by one projection over their rows stacked (``stacked``): on the
        2-core SPR, q4_0 predicted decode of the 4-layer 7B shape ran 1.04-1.10× as fast (alternate rounds in
        one process; benchmarks/results/README.md)."""
        fused = stacked((self.q_proj, self.k_proj, self.v_proj))  # ((H + 2 KVH) hd, d)
        del self.q_proj, self.k_proj, self.v_proj
        self.qkv_proj = fused

    def _project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (B, T, d) -> q (B, T, H hd), k and v (B, T, KVH hd); from the fused projection, views of it."""
        if self.qkv_proj is None:
            return self.q_proj(x), self.k_proj(x), self.v_proj(x)
        kv = self.num_kv_heads * self.head_dim
        q, k, v = self.qkv_proj(x).split((self.num_heads * self.head_dim, kv, kv), dim=-1)
        return q, k, v

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        attend: _Attend,
        k_cache: torch.Tensor | None,
        v_cache: torch.Tensor | None,
    ) -> torch.Tensor:
        B, T, _ = x.shape
        H, KVH, hd = self.num_heads, self.num_kv_heads, self.head_dim
        if attend.cpu_decode is not None and k_cache is not None and v_cache is not None:
            dec = attend.cpu_decode  # T == 1; the op reads q, k and v out of the stacked projection
            qkv = self.qkv_proj(x) if self.qkv_proj is not None else torch.cat(self._project(x), dim=-1)
            y = ops.decode_attention(
                qkv, dec.cos, dec.sin, k_cache, v_cache, dec.slots, dec.positions, H, hd**-0.5
            )  # (B, 1, H hd)
            return self.o_proj(y)
        q, k, v = self._project(x)
        q = q.view(B, T, H, hd).transpose(1, 2)  # (B, H, T, hd)
        k = k.view(B, T, KVH, hd).transpose(1, 2)  # (B, KVH, T, hd)
        v = v.view(B, T, KVH, hd).transpose(1, 2)  # (B, KVH, T, hd)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if k_cache is not None and v_cache is not None:
            attend.write(k_cache, k)
            attend.write(v_cache, v)
            k, v = attend.read(k_cache), attend.read(v_cache)  # (B, KVH, window, hd)
        gqa = self.num_heads != self.num_kv_heads
        if attend.length_groups is not None:
            y = _attend_by_length(q, k, v, attend.length_groups, gqa)
        else:
            y = F.scaled_dot_product_attention(
                q, k, v, attn_mask=attend.mask, is_causal=attend.is_causal, enable_gqa=gqa
            )  # (B, H, T, hd)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.num_heads * self.head_dim))  # (B, T, d)


def _length_groups(lengths: list[int], device: torch.device) -> list[tuple[int, torch.Tensor]]:
    """[(n, indices of the rows of real length n)] for each distinct length."""
    rows_of: dict[int, list[int]] = {}
    for b, n in enumerate(lengths):
        rows_of.setdefault(n, []).append(b)
    return [(n, torch.tensor(rows, device=device)) for n, rows in rows_of.items()]


def _attend_by_length(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    groups: list[tuple[int, torch.Tensor]],
    gqa: bool,
) -> torch.Tensor:
    """Causal attention of right-padded fresh prompts, the rows of each real length together, cut to it:
    q (B, H, T, hd), k/v (B, KVH, T, hd) -> (B, H, T, hd), zeros at the padding."""
    y = torch.zeros_like(q)
    for n, idx in groups:
        y[idx, :, :n] = F.scaled_dot_product_attention(
            q[idx, :, :n], k[idx, :, :n], v[idx, :, :n], is_causal=n > 1, enable_gqa=gqa
        )  # (b_n, H, n, hd)
    return y


class Block(nn.Module):
    def __init__(self, config: ModelConfig, layer: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp: nn.Module = FFN(config, layer)  # the engine's SparseFFN replaces it for sparse execution
        self.residual_scale = config.residual_scale

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        attend: _Attend,
        k_cache: torch.Tensor | None,
        v_cache: torch.Tensor | None,
        step: ForwardStep | None,
    ) -> torch.Tensor:
        a = self.self_attn(self.input_layernorm(x), cos, sin, attend, k_cache, v_cache)  # (B, T, d)
        x = x + a * self.residual_scale if self.residual_scale != 1.0 else x + a
        f = self.mlp(self.post_attention_layernorm(x), step)  # (B, T, d)
        return x + f * self.residual_scale if self.residual_scale != 1.0 else x + f


def stack_projections(model: nn.Module) -> None:
    """``Attention.fuse_qkv`` on every attention of ``model`` and ``FFN.fuse_gate_up`` on every dense FFN
    left in it (the engine does this at load, after its sparse runtime took the FFNs it runs)."""
    for module in model.modules():
        if isinstance(module, Attention) and module.qkv_proj is None:
            module.fuse_qkv()
        elif isinstance(module, FFN):
            module.fuse_gate_up()


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self._cos: torch.Tensor | None = None  # (P, hd) in the model dtype, grown on demand
        self._sin: torch.Tensor | None = None

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_tokens.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.embed_tokens.weight.device

    def new_cache(self, max_batch: int, max_seq: int) -> KVCache:
        """A KV cache in this model's dtype and device."""
        return KVCache(self.config, max_batch, max_seq, dtype=self.dtype, device=self.device)

    def _rope(self, num_positions: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin tables covering at least ``num_positions``; rebuilt only when outgrown or moved."""
        cos = self._cos
        if (
            cos is None
            or cos.shape[0] < num_positions
            or cos.dtype != self.dtype
            or cos.device != self.device
        ):
            size = max(num_positions, min(self.config.max_position_embeddings, 4096))
            if cos is not None and cos.shape[0] < num_positions:
                size = max(size, 2 * cos.shape[0])  # amortise growth
            inv_freq = inverse_frequencies(self.config.rope, self.config.head_dim)
            self._cos, self._sin = rope_tables(inv_freq, size, self.dtype, self.device)
        return self._cos, self._sin

    def forward(
        self,
        tokens: torch.Tensor,
        cache: KVCache | None = None,
        slots: torch.Tensor | None = None,
        last_only: bool = False,
        step: ForwardStep | None = None,
    ) -> torch.Tensor:
        """Logits (B, T, vocab), or (B, 1, vocab) with ``last_only``, as float32.

        tokens: (B, T) token ids. With ``cache``, row b continues the sequence in slot ``slots[b]``
        (default: slot b). ``step`` (``model.step``): the rows' sparsity modes and, with ``cache`` and
        ``last_only`` only, their real ``lengths`` when right-padded (see the module docstring); every FFN
        records its counts into it. None: every row dense, nothing counted.
        """
        B, T = tokens.shape
        lengths = None
        if step is not None and step.lengths is not None:
            if cache is None or not last_only:
                raise ValueError("lengths (right-padded rows) needs a cache and last_only=True")
            if len(step.lengths) != B or min(step.lengths) < 1 or max(step.lengths) > T:
                got = list(step.lengths)
                raise ValueError(f"lengths must be (B,) = ({B},) values in [1, {T}], got {got}")
            lengths = torch.tensor(step.lengths)  # (B,) on the CPU
        x = self.embed_tokens(tokens)  # (B, T, d)
        if self.config.embedding_scale != 1.0:
            x = x * self.config.embedding_scale
        if cache is None:
            cos, sin = self._rope(T)
            cos, sin = cos[None, None, :T], sin[None, None, :T]  # (1, 1, T, hd)
            attend = causal_attend(T)
        else:
            if cache.dtype != self.dtype:
                raise ValueError(f"KV cache dtype {cache.dtype} differs from the model dtype {self.dtype}")
            if slots is None:
                slots = torch.arange(B)
            slot_ids = slots.tolist()  # one host copy: the cache bookkeeping is plain Python
            cos, sin, attend = self._cached_step(cache, slots, slot_ids, T)
            if lengths is not None and int(lengths.min()) < T:
                if attend.start != 0:
                    raise ValueError("right-padded rows (lengths) must all start in an empty cache slot")
                attend.length_groups = _length_groups(lengths.tolist(), self.device)

        for i, layer in enumerate(self.layers):
            k_cache = cache.k[i] if cache is not None else None
            v_cache = cache.v[i] if cache is not None else None
            x = layer(x, cos, sin, attend, k_cache, v_cache, step)  # (B, T, d)

        if lengths is not None:
            last = (lengths - 1).to(x.device)  # (B,) each row's last real token
            x = x[torch.arange(B, device=x.device), last][:, None]  # (B, 1, d)
        elif last_only:
            x = x[:, -1:]  # (B, 1, d): prefill only needs the next token's logits
        x = self.norm(x)
        if self.config.logit_divisor != 1.0:
            x = x / self.config.logit_divisor
        logits = self.lm_head(x).float()  # (B, T or 1, vocab)
        if cache is not None:
            cache.advance(slot_ids, T if step is None or step.lengths is None else list(step.lengths))
        return logits

    def _cached_step(
        self, cache: KVCache, slots: torch.Tensor, slot_ids: list[int], T: int
    ) -> tuple[torch.Tensor, torch.Tensor, _Attend]:
        # Python ints until a tensor is needed: each torch op on these few values costs tens of
        # microseconds in a CPU decode step (kv_cache's docstring).
        start_list = cache.reserve(slot_ids, T)  # raises before anything is written
        B = len(slot_ids)
        s0 = slot_ids[0]
        contiguous = slot_ids == list(range(s0, s0 + B))
        first, last = min(start_list), max(start_list)
        uniform = first == last
        window = last + T
        cos_t, sin_t = self._rope(window)
        dev = self.device
        starts = torch.tensor(start_list)  # (B,) int64 on the CPU
        if T == 1 and dev.type == "cpu":
            slots_cpu = (
                slots if slots.device.type == "cpu" and slots.dtype == torch.long else torch.tensor(slot_ids)
            )
            decode = _CpuDecode(cos_t, sin_t, slots_cpu, starts)
            attend = _Attend(
                window=window,
                mask=None,
                is_causal=False,
                slot_slice=None,
                slots=None,
                start=None,
                positions=None,
                cpu_decode=decode,
            )
            return cos_t, sin_t, attend
        # (B, T) absolute positions, needed unless every row is written through one slice of the cache
        positions = None if (uniform and contiguous) else (starts[:, None] + torch.arange(T)).to(dev)
        if uniform:
            cos, sin = (
                cos_t[None, None, first:window],
                sin_t[None, None, first:window],
            )  # (1, 1, T, hd): views
        else:
            cos, sin = cos_t[positions].unsqueeze(1), sin_t[positions].unsqueeze(1)  # (B, 1, T, hd)

        mask, is_causal = None, False
        if uniform and first == 0:
            is_causal = T > 1  # a fresh prefill: the ordinary causal mask
        elif not (uniform and T == 1):
            # Query t of row b sits at position starts[b] + t and may see keys up to and including it; later
            # keys are the row's future or stale entries of a shorter row.
            limit = (starts[:, None] + torch.arange(T)).to(dev)  # (B, T)
            keys = torch.arange(window, device=dev)  # (window,)
            mask = (keys[None, None, :] <= limit[:, :, None]).unsqueeze(1)  # (B, 1, T, window)
        attend = _Attend(
            window=window,
            mask=mask,
            is_causal=is_causal,
            slot_slice=slice(s0, s0 + B) if contiguous else None,
            slots=slots.to(dev, torch.long),
            start=first if uniform else None,
            positions=positions,
        )
        return cos, sin, attend
