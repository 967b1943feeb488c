"""Our decoder against transformers on tiny random checkpoints: logits, 32 greedy tokens, cache paths."""

from __future__ import annotations

import pytest
import torch

from sparseinfer.model import Transformer, load_model

transformers = pytest.importorskip("transformers")

VARIANTS = {
    "swiglu-gqa": dict(),
    "relu-gated-tied": dict(hidden_act="relu", tie_word_embeddings=True),
    "relu2-gated-mha": dict(hidden_act="relu2", num_key_value_heads=4),
    "silu-rope-linear": dict(rope_parameters={"rope_type": "linear", "rope_theta": 500.0, "factor": 4.0}),
    "silu-rope-llama3": dict(
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": 10000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 16,
        }
    ),
    "bias-headdim": dict(attention_bias=True, mlp_bias=True, head_dim=32),
    "mistral": dict(arch="mistral", hidden_act="relu", sliding_window=None),
}


def hf_model(path):
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None  # always produce all requested tokens
    return model


@torch.inference_mode()
def greedy(model: Transformer, prompt: torch.Tensor, steps: int) -> list[int]:
    """Greedy decoding with the KV cache: one prefill, then one token per step."""
    cache = model.new_cache(max_batch=1, max_seq=prompt.shape[1] + steps)
    slot = torch.tensor([cache.allocate()])
    logits = model(prompt, cache, slot, last_only=True)  # (1, 1, V)
    out = []
    for _ in range(steps):
        token = logits[:, -1].argmax(-1)  # (1,)
        out.append(int(token))
        logits = model(token[:, None], cache, slot)
    return out


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_matches_transformers(make_hf_checkpoint, variant):
    path = make_hf_checkpoint(**VARIANTS[variant])
    ref, ours = hf_model(path), load_model(path)
    prompt = torch.randint(2, 512, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        expected = ref(prompt).logits
        got = ours(prompt)
    assert got.dtype == torch.float32 and got.shape == expected.shape
    assert (got - expected).abs().max() < 1e-4

    with torch.inference_mode():
        hf_tokens = ref.generate(prompt[:1], max_new_tokens=32, do_sample=False, pad_token_id=0)[
            0, 12:
        ].tolist()
    assert greedy(ours, prompt[:1], 32) == hf_tokens


@torch.inference_mode()
def test_cache_path_equals_full_forward(tiny_llama_checkpoint):
    model = load_model(tiny_llama_checkpoint)
    tokens = torch.randint(2, 512, (1, 20), generator=torch.Generator().manual_seed(2))
    full = model(tokens)  # (1, 20, V)
    cache = model.new_cache(max_batch=3, max_seq=32)
    cache.allocate()  # occupy slot 0 so that the sequence lives in a non-zero slot
    slot = torch.tensor([cache.allocate()])
    pieces = [
        model(tokens[:, :7], cache, slot),
        model(tokens[:, 7:8], cache, slot),
        model(tokens[:, 8:], cache, slot),
    ]
    assert int(cache.lengths[slot]) == 20
    assert (torch.cat(pieces, dim=1) - full).abs().max() < 1e-5
    # last_only gives the last position's logits of the same computation
    cache.free(int(slot))
    slot = torch.tensor([cache.allocate()])
    last = model(tokens, cache, slot, last_only=True)
    assert last.shape == (1, 1, full.shape[-1])
    assert (last[:, 0] - full[:, -1]).abs().max() < 1e-5


@torch.inference_mode()
@pytest.mark.parametrize("num_new", [1, 3])
@pytest.mark.parametrize("lengths", [(5, 11), (7, 7)])
def test_batch_of_different_lengths_equals_each_alone(tiny_llama_checkpoint, num_new, lengths):
    model = load_model(tiny_llama_checkpoint)
    gen = torch.Generator().manual_seed(3)
    prompts = [torch.randint(2, 512, (1, n), generator=gen) for n in lengths]
    step = torch.randint(2, 512, (2, num_new), generator=gen)

    alone = []
    for prompt, new in zip(prompts, step, strict=True):
        cache = model.new_cache(max_batch=1, max_seq=32)
        slot = torch.tensor([cache.allocate()])
        model(prompt, cache, slot)
        alone.append(model(new[None], cache, slot))  # (1, num_new, V)

    cache = model.new_cache(max_batch=4, max_seq=32)
    slots = [cache.allocate() for _ in range(4)]
    # prefill the two sequences separately into non-adjacent slots (3 and 1, out of order)
    chosen = torch.tensor([slots[3], slots[1]])
    for prompt, slot in zip(prompts, chosen, strict=True):
        model(prompt, cache, slot[None])
    batched = model(step, cache, chosen)  # (2, num_new, V): rows continue from their own lengths
    assert cache.lengths[chosen].tolist() == [lengths[0] + num_new, lengths[1] + num_new]
    assert (batched - torch.cat(alone)).abs().max() < 1e-5
