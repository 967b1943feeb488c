"""layerwise_ffn_inputs against the FFN inputs a normal full forward sees (a forward hook on each
layer's mlp), and the calibration-text loader's shapes and errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from sparseinfer.model import load_model, load_tokenizer
from sparseinfer.sparsity.capture import layerwise_ffn_inputs
from sparseinfer.sparsity.data import (
    MIN_CALIBRATION_TOKENS,
    load_text_tokens,
    text_sha256,
    tokens_to_sequences,
)


def _hooked_ffn_inputs(model, sequences: torch.Tensor) -> list[torch.Tensor]:
    seen: list[list[torch.Tensor]] = [[] for _ in model.layers]
    handles = [
        layer.mlp.register_forward_hook(lambda mod, args, out, i=i: seen[i].append(args[0].detach().clone()))
        for i, layer in enumerate(model.layers)
    ]
    try:
        with torch.no_grad():
            model(sequences)
    finally:
        for h in handles:
            h.remove()
    return [torch.cat(s).reshape(-1, s[0].shape[-1]) for s in seen]


@pytest.mark.parametrize("chunk", [1, 3, 16])
def test_layerwise_capture_equals_full_forward(tiny_model, calibration_sequences, chunk: int) -> None:
    seqs = calibration_sequences[:5]  # 5 sequences: chunk 3 leaves a ragged last chunk
    expected = _hooked_ffn_inputs(tiny_model, seqs)
    got = [(li, x.clone()) for li, x in layerwise_ffn_inputs(tiny_model, seqs, chunk=chunk, progress=False)]
    assert [li for li, _ in got] == list(range(len(tiny_model.layers)))
    for (li, x), ref in zip(got, expected, strict=True):
        assert x.shape == (seqs.numel(), tiny_model.config.hidden_size)
        torch.testing.assert_close(x, ref, rtol=1e-5, atol=1e-6, msg=f"layer {li}")


def test_layerwise_capture_gated_bf16(gated_checkpoint: Path) -> None:
    model = load_model(gated_checkpoint, dtype=torch.bfloat16)
    seqs = torch.randint(2, 500, (4, 16), generator=torch.Generator().manual_seed(0))
    expected = _hooked_ffn_inputs(model, seqs)
    for li, x in layerwise_ffn_inputs(model, seqs, chunk=2, progress=False):
        assert x.dtype == torch.bfloat16
        torch.testing.assert_close(x, expected[li], rtol=0, atol=0)  # same kernels, same order: bit-equal


def test_capture_rejects_bad_shapes(tiny_model) -> None:
    with pytest.raises(ValueError, match="sequences must be"):
        next(layerwise_ffn_inputs(tiny_model, torch.zeros(8, dtype=torch.long)))
    with pytest.raises(ValueError, match="chunk"):
        next(layerwise_ffn_inputs(tiny_model, torch.zeros(2, 4, dtype=torch.long), chunk=0))


def test_load_text_tokens(sparse_checkpoint: Path, calibration_text: Path) -> None:
    tok = load_tokenizer(sparse_checkpoint)
    ids = tok.encode(calibration_text.read_text())
    seqs = load_text_tokens(tok, calibration_text, num_tokens=1000, seq_len=128)
    assert seqs.shape == (7, 128) and seqs.dtype == torch.long  # 1000 // 128 whole windows
    assert seqs.flatten().tolist() == ids[: 7 * 128]
    full = load_text_tokens(tok, calibration_text, seq_len=100)
    assert full.numel() == len(ids) // 100 * 100


def test_text_too_short_is_a_clear_error(sparse_checkpoint: Path, short_text: Path) -> None:
    tok = load_tokenizer(sparse_checkpoint)
    with pytest.raises(ValueError, match=rf"too short.*at least {MIN_CALIBRATION_TOKENS} tokens"):
        load_text_tokens(tok, short_text)
    with pytest.raises(ValueError, match="--tokens 10: at least"):
        tokens_to_sequences(list(range(5000)), num_tokens=10)
    with pytest.raises(ValueError, match="no such file"):
        load_text_tokens(tok, short_text.parent / "missing.txt")


def test_text_sha256(tmp_path: Path) -> None:
    f = tmp_path / "t.txt"
    f.write_bytes(b"abc")
    assert text_sha256(f) == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
