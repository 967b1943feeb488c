"""Stream the FFN inputs of every calibration token, one layer at a time.

A 7B model with 2^17 calibration tokens has 2^17 × 11008 × 32 × 2 bytes = 92 GB of FFN activations, so
nothing here holds more than one layer. ``layerwise_ffn_inputs`` keeps only the residual stream of all tokens
(N × d in the model dtype: 2^17 × 4096 × 2 bytes = 1 GiB) and advances it through one decoder layer at a time,
over all sequences in chunks; after layer l's attention it yields layer l's FFN inputs (post-attention
RMSNorm), lets the caller consume them, then finishes the layer (FFN + residual) and moves on. Memory:

    2 · N · d · bytes(model dtype)       residual stream + FFN inputs of all N tokens
    + one chunk's temporaries            chunk · T · (m + 4·d) plus chunk · heads · T² for attention scores

The caller sees each layer's x exactly as a normal full forward computes it (same kernels, same dtype).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from tqdm.auto import tqdm

from sparseinfer.model.transformer import Transformer, causal_attend


@torch.no_grad()
def layerwise_ffn_inputs(
    model: Transformer,
    sequences: torch.Tensor,
    chunk: int = 8,
    progress: bool = True,
) -> Iterator[tuple[int, torch.Tensor]]:
    """Yield ``(layer_index, x)`` for every layer in order; x (N_seq·T, d) in the model dtype holds the FFN
    inputs of all tokens of ``sequences`` (N_seq, T) for that layer, rows ordered sequence-major (row s·T + t
    is token t of sequence s).

    ``chunk`` is the number of sequences run through a layer at a time. The yielded tensor is only valid until
    the generator resumes (it is reused for the next layer); copy what must outlive it, and do not modify it
    (the layer's FFN half runs on it after the caller is done).
    """
    if sequences.dim() != 2:
        raise ValueError(f"sequences must be (N_seq, T) token ids, got shape {tuple(sequences.shape)}")
    if chunk < 1:
        raise ValueError(f"chunk must be ≥ 1, got {chunk}")
    n_seq, T = sequences.shape
    device, cfg = model.device, model.config
    cos, sin = model._rope(T)
    cos, sin = cos[None, None, :T], sin[None, None, :T]  # (1, 1, T, hd)
    attend = causal_attend(T)

    stream = torch.empty(n_seq, T, cfg.hidden_size, dtype=model.dtype, device=device)  # (N, T, d) residual
    for s in range(0, n_seq, chunk):
        x = model.embed_tokens(sequences[s : s + chunk].to(device))  # (c, T, d)
        if cfg.embedding_scale != 1.0:
            x = x * cfg.embedding_scale
        stream[s : s + chunk] = x
    ffn_in = torch.empty_like(stream)  # (N, T, d)

    layers = tqdm(enumerate(model.layers), total=len(model.layers), desc="layers", disable=not progress)
    for li, layer in layers:
        # Attention half: stream becomes the post-attention residual, ffn_in its RMSNorm (the FFN input).
        for s in range(0, n_seq, chunk):
            x = stream[s : s + chunk]  # (c, T, d)
            a = layer.self_attn(layer.input_layernorm(x), cos, sin, attend, None, None)  # (c, T, d)
            x = x + a * layer.residual_scale if layer.residual_scale != 1.0 else x + a
            stream[s : s + chunk] = x
            ffn_in[s : s + chunk] = layer.post_attention_layernorm(x)
        yield li, ffn_in.view(n_seq * T, cfg.hidden_size)
        # FFN half, from the same inputs the caller saw.
        for s in range(0, n_seq, chunk):
            f = layer.mlp(ffn_in[s : s + chunk])  # (c, T, d)
            x = stream[s : s + chunk]
            stream[s : s + chunk] = x + f * layer.residual_scale if layer.residual_scale != 1.0 else x + f
