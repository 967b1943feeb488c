"""Prefilling several prompts in one right-padded forward gives each request what prefilling it alone gives:
the same tokens and sparsity report (padding counted nowhere), logits and continuation equal to 1e-5 in
fp32 and the first token's bit for bit on the bundled bf16 model. The oracle is the one-prompt-at-a-time
path (itself tested against transformers and brute force)."""

from __future__ import annotations

import pytest
import torch

from sparseinfer.engine.generate import Engine
from sparseinfer.engine.modes import SparseRuntime, SparsityConfig
from sparseinfer.engine.sampling import SamplingParams
from sparseinfer.model import load_model, load_tokenizer
from sparseinfer.model.bundled import bundled_model_path
from sparseinfer.model.kv_cache import KVCache
from sparseinfer.model.step import ForwardStep

PROMPTS = [[3, 4, 5, 6, 7], [8, 9], [10, 11, 12, 13, 14, 15, 16, 17, 18], [19]]
DECODE_STEPS = 5


def _params(i: int) -> SamplingParams:
    return SamplingParams(
        max_new_tokens=DECODE_STEPS + 1, temperature=0.9, seed=i, logprobs=True, ignore_eos=True
    )


def _run_alone(gen: Engine, prompt: list[int], params: SamplingParams, mode: str | None):
    """(sequence, its log-probabilities) prefilled and decoded on its own."""
    seq = gen.start(prompt, params, sparsity_mode=mode)
    logprobs = list(gen.prefill(seq).logprobs)
    while not seq.finished:
        (event,) = gen.decode_step([seq])
        logprobs += event.logprobs
    return seq, logprobs


def _run_together(gen: Engine, prompts, params, modes):
    """The same, all prompts prefilled in one ``prefill_batch`` and decoded in batched steps."""
    seqs = [gen.start(p, sp, sparsity_mode=mo) for p, sp, mo in zip(prompts, params, modes, strict=True)]
    logprobs = [list(e.logprobs) for e in gen.prefill_batch(seqs)]
    while any(not s.finished for s in seqs):
        live = [i for i, s in enumerate(seqs) if not s.finished]
        for i, event in zip(live, gen.decode_step([seqs[i] for i in live]), strict=True):
            logprobs[i] += event.logprobs
    return list(zip(seqs, logprobs, strict=True))


def test_padded_forward_equals_each_row_alone(tiny_random_checkpoint):
    model = load_model(tiny_random_checkpoint, dtype=torch.float32).eval()
    prompts = [PROMPTS[0], PROMPTS[2]]
    expected = []
    for p in prompts:
        cache = model.new_cache(1, 32)
        first = model(torch.tensor([p]), cache=cache, last_only=True)  # (1, 1, V)
        step = model(torch.tensor([[7]]), cache=cache)  # one decode step after the prompt
        expected.append((first, step))
    cache = model.new_cache(2, 32)
    padded = torch.tensor([prompts[0] + [0] * 4, prompts[1]])  # (2, 9)
    step = ForwardStep.of(["dense"] * 2, lengths=[5, 9])
    first = model(padded, cache=cache, last_only=True, step=step)  # (2, 1, V)
    assert cache.lengths[:2].tolist() == [5, 9]  # each slot advanced by its own length, not by 9
    step = model(torch.tensor([[7], [7]]), cache=cache)  # rows now at different lengths
    for b, (e_first, e_step) in enumerate(expected):
        torch.testing.assert_close(first[b : b + 1], e_first, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(step[b : b + 1], e_step, rtol=1e-5, atol=1e-5)


def test_padded_forward_rejects_bad_lengths(tiny_random_checkpoint):
    model = load_model(tiny_random_checkpoint, dtype=torch.float32).eval()
    tokens = torch.tensor([[3, 4, 5], [6, 7, 8]])
    for lengths in ([0, 3], [2, 4], [3]):
        with pytest.raises(ValueError, match="lengths"):
            step = ForwardStep.of(["dense"] * len(lengths), lengths)
            model(tokens, cache=model.new_cache(2, 8), last_only=True, step=step)
    with pytest.raises(ValueError, match="needs a cache and last_only"):
        model(tokens, step=ForwardStep.of(["dense"] * 2, [3, 2]))


@pytest.mark.parametrize(
    "modes", [["oracle"] * 4, ["predicted"] * 4, ["dense"] * 4, ["oracle", "predicted", "dense", "predicted"]]
)
def test_prefill_batch_equals_prefill_alone_in_every_mode(calibrated_checkpoint, load_calibrated, modes):
    """Tokens, log-probabilities and the whole sparsity report (true active sets measured too)."""
    model = load_calibrated(calibrated_checkpoint)
    config = SparsityConfig(mode="predicted", measure_truth=True)
    rt = SparseRuntime.from_checkpoint(model, calibrated_checkpoint, config, max_batch=4, max_seq=64)
    gen = Engine(model, load_tokenizer(calibrated_checkpoint), max_batch=4, max_seq=64, sparsity=rt)
    params = [_params(i) for i in range(len(PROMPTS))]
    alone = [_run_alone(gen, p, sp, mo) for p, sp, mo in zip(PROMPTS, params, modes, strict=True)]
    together = _run_together(gen, PROMPTS, params, modes)
    for (a, a_logprobs), (b, b_logprobs) in zip(alone, together, strict=True):
        assert b.output_ids == a.output_ids
        torch.testing.assert_close(b_logprobs, a_logprobs, rtol=1e-5, atol=1e-5)
        report = b.sparsity.report()
        assert report == a.sparsity.report()
        assert report.tokens == len(b.prompt_ids) + DECODE_STEPS  # the padding counted nowhere
    assert gen.cache.num_free == 4


def test_prefill_batch_equals_prefill_alone_on_the_bundled_model():
    """The shipped bf16 model, dense, as the server runs it: the same tokens and reports, and close
    log-probabilities. Not bit for bit: a projection's kernel depends on how many rows it is given (ours up
    to the calibrated ``rows_up_to``, torch's beyond: model.linear), so a prompt prefilled alone and the
    same prompt in a batch may round differently; and later steps decode rows of different lengths
    together, where the CPU attention kernel's masked path rounds a bf16 row slightly differently."""
    path = bundled_model_path()
    gen = Engine(load_model(path).eval(), load_tokenizer(path), max_batch=4, max_seq=64)
    params = [_params(i) for i in range(len(PROMPTS))]
    alone = [_run_alone(gen, p, sp, None) for p, sp in zip(PROMPTS, params, strict=True)]
    together = _run_together(gen, PROMPTS, params, [None] * len(PROMPTS))
    for (a, a_logprobs), (b, b_logprobs) in zip(alone, together, strict=True):
        assert b.output_ids == a.output_ids
        torch.testing.assert_close(b_logprobs, a_logprobs, rtol=0, atol=0.05)
        assert b.sparsity.report() == a.sparsity.report()


def test_a_failed_prefill_batch_leaves_slots_and_tallies_as_they_were(calibrated_checkpoint, load_calibrated):
    model = load_calibrated(calibrated_checkpoint)
    config = SparsityConfig(mode="oracle")
    rt = SparseRuntime.from_checkpoint(model, calibrated_checkpoint, config, max_batch=4, max_seq=64)
    gen = Engine(model, load_tokenizer(calibrated_checkpoint), max_batch=4, max_seq=64, sparsity=rt)
    seqs = [gen.start(p, _params(i)) for i, p in enumerate(PROMPTS[:3])]
    # Fail in the last layer's FFN, after every other layer has counted this step.
    last = model.layers[-1].mlp
    original = last.forward
    last.forward = lambda x, step=None: (_ for _ in ()).throw(RuntimeError("injected"))
    with pytest.raises(RuntimeError, match="injected"):
        gen.prefill_batch(seqs)
    assert gen.cache.num_free == 4 and all(s.slot is None for s in seqs)
    assert all(s.sparsity.report().tokens == 0 for s in seqs)
    last.forward = original
    gen.prefill_batch(seqs)  # the same sequences can be retried
    assert [s.sparsity.report().tokens for s in seqs] == [len(p) for p in PROMPTS[:3]]


def test_prefill_batch_needs_a_slot_per_prompt(tiny_random_checkpoint):
    model = load_model(tiny_random_checkpoint, dtype=torch.float32).eval()
    cache = KVCache(model.config, 2, 32)
    gen = Engine(model, load_tokenizer(tiny_random_checkpoint), max_batch=2, max_seq=32, cache=cache)
    seqs = [gen.start(p, _params(i)) for i, p in enumerate(PROMPTS[:3])]
    with pytest.raises(RuntimeError, match="3 prompts to prefill but 2 free"):
        gen.prefill_batch(seqs)
    assert cache.num_free == 2
