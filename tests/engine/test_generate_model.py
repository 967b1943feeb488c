"""The generation loop on the real model runtime (tiny checkpoints from tests/conftest.py)."""

import dataclasses

import pytest
import torch

from sparseinfer.engine import Engine, SamplingParams
from sparseinfer.model import load_model, load_tokenizer

PROMPTS = ["The quick brown fox", "A", "Most neurons of a feed-forward layer stay quiet for any given token"]
GREEDY = SamplingParams(temperature=0.0, max_new_tokens=16, ignore_eos=True)


@pytest.fixture(scope="module")
def llama(tiny_llama_checkpoint):
    return load_model(tiny_llama_checkpoint), load_tokenizer(tiny_llama_checkpoint)


def _naive_greedy(model, ids, n):
    ids = list(ids)
    with torch.inference_mode():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[-n:]


@pytest.mark.parametrize("prompt", PROMPTS)
def test_greedy_matches_no_cache_forwards_and_transformers(llama, tiny_llama_checkpoint, prompt):
    model, tok = llama
    result = Engine(model, tok, max_seq=64).generate(prompt, GREEDY)
    ids = tok.encode(prompt)
    assert list(result.token_ids) == _naive_greedy(model, ids, 16)

    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tiny_llama_checkpoint).eval()
    out = hf.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=16, min_new_tokens=16)
    assert list(result.token_ids) == out[0, len(ids) :].tolist()


def test_streamed_text_is_the_decoded_completion(llama):
    model, tok = llama
    gen = Engine(model, tok, max_seq=64)
    events = list(gen.generate_stream(PROMPTS[0], dataclasses.replace(GREEDY, max_new_tokens=24)))
    ids = [t for e in events for t in e.token_ids]
    assert "".join(e.text for e in events) == tok.decode(ids)
    assert events[-1].finish_reason == "length"


@pytest.mark.parametrize("greedy", [True, False], ids=["greedy", "seeded"])
def test_batch_of_different_lengths_equals_each_alone(llama, greedy):
    model, tok = llama
    if greedy:
        params = [dataclasses.replace(GREEDY, max_new_tokens=n) for n in (12, 6, 9)]
    else:
        params = [
            SamplingParams(temperature=0.8, seed=11, max_new_tokens=12, ignore_eos=True),
            SamplingParams(temperature=1.0, top_k=50, top_p=0.9, seed=12, max_new_tokens=6),
            SamplingParams(
                temperature=0.7, repetition_penalty=1.3, seed=13, max_new_tokens=9, ignore_eos=True
            ),
        ]
    alone = [Engine(model, tok, max_seq=64).generate(p, sp) for p, sp in zip(PROMPTS, params, strict=True)]
    batched = Engine(model, tok, max_batch=3, max_seq=64).generate_batch(PROMPTS, params)
    assert [r.token_ids for r in batched] == [r.token_ids for r in alone]
    assert [r.text for r in batched] == [r.text for r in alone]


def test_random_checkpoint_bf16_runs(tmp_path):
    from sparseinfer.model.random_checkpoint import write_random_checkpoint

    path = write_random_checkpoint(tmp_path / "ckpt")
    model, tok = load_model(path, dtype=torch.bfloat16), load_tokenizer(path)
    result = Engine(model, tok, max_seq=64).generate("Once upon a time", GREEDY)
    assert result.completion_tokens == 16
    assert result.stats.decode_tokens_per_s > 0
