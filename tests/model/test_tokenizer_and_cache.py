"""Tokenizer loading (BOS/EOS rules), incremental decoding, and the KV cache's slot bookkeeping."""

from __future__ import annotations

import json

import pytest
import torch

from sparseinfer.model import IncrementalDecoder, load_model, load_tokenizer
from sparseinfer.model.kv_cache import CacheFullError, KVCache
from sparseinfer.model.random_checkpoint import write_random_checkpoint

TEXT = "The quick brown fox – naïve café 🦊 jumps!"


@pytest.fixture
def ckpt(tmp_path):
    return write_random_checkpoint(tmp_path / "ckpt")


def test_encode_decode_and_special_ids(ckpt):
    tok = load_tokenizer(ckpt)
    ids = tok.encode(TEXT)
    assert ids[0] == tok.bos_token_id == 0 and ids.count(0) == 1  # BOS once, not twice
    assert tok.encode(TEXT, add_bos=False) == ids[1:]
    assert tok.decode(ids) == TEXT
    assert tok.eos_token_ids == frozenset({1})
    assert tok.vocab_size <= 512


def test_bos_and_eos_from_side_files(ckpt):
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["eos_token_id"] = [1, 5]
    (ckpt / "config.json").write_text(json.dumps(cfg))
    (ckpt / "generation_config.json").write_text(json.dumps({"eos_token_id": 7}))
    (ckpt / "tokenizer_config.json").write_text(
        json.dumps({"add_bos_token": False, "eos_token": {"content": "<s>"}})
    )
    tok = load_tokenizer(ckpt)
    assert tok.eos_token_ids == frozenset({0, 1, 5, 7})
    assert tok.encode("hello")[0] != 0  # add_bos_token false wins over the post-processor


def test_incremental_decoder_streams_exactly_the_text(ckpt):
    tok = load_tokenizer(ckpt)
    prompt = tok.encode("Once upon")
    generated = tok.encode(" a time – naïve 🦊 café, the end.", add_bos=False)
    dec = IncrementalDecoder(tok, prompt_ids=prompt)
    pieces = [dec.step(generated[: i + 1]) for i in range(len(generated))]
    pieces.append(dec.flush())
    assert "".join(pieces) == tok.decode(generated)
    assert all("\ufffd" not in p for p in pieces)  # split multi-byte characters were held back, not mangled
    assert "" in pieces  # ...which means at least one step emitted nothing (🦊 is 4 bytes)


def test_kv_cache_slots(tiny_random_checkpoint):
    model = load_model(tiny_random_checkpoint)
    cache = KVCache(model.config, max_batch=2, max_seq=8, dtype=model.dtype)
    assert cache.k[0].shape == (2, model.config.num_kv_heads, 8, model.config.head_dim)
    a, b = cache.allocate(), cache.allocate()
    assert {a, b} == {0, 1}
    with pytest.raises(CacheFullError, match="all 2 slots are in use"):
        cache.allocate()
    with torch.inference_mode():
        model(torch.ones(1, 6, dtype=torch.long), cache, torch.tensor([a]))
        assert int(cache.lengths[a]) == 6
        with pytest.raises(CacheFullError, match="holds 6 positions; adding 3 would exceed max_seq=8"):
            model(torch.ones(1, 3, dtype=torch.long), cache, torch.tensor([a]))
        assert int(cache.lengths[a]) == 6  # the failed step changed nothing
    cache.free(a)
    assert int(cache.lengths[a]) == 0 and cache.allocate() == a
    with pytest.raises(ValueError, match="not allocated"):
        cache.free(a) or cache.free(a)
    cache.reset()
    assert cache.num_free == 2 and int(cache.lengths.sum()) == 0


def test_cache_dtype_must_match_model(tiny_random_checkpoint):
    model = load_model(tiny_random_checkpoint)
    cache = KVCache(model.config, 1, 8, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="dtype"):
        model(torch.ones(1, 2, dtype=torch.long), cache, torch.tensor([cache.allocate()]))
