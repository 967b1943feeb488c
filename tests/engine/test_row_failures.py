"""One request's failure stays that request's (reliability issue, item 1).

(a) Every value ``SamplingParams.validate`` accepts is computable: hypothesis over the whole range of every
    numeric field (doubles from subnormal to 1.8e308, any int), against logits with zeros and extremes.
(b) A row that fails inside a step (non-finite logits, its own sampler raising) ends alone with
    ``RequestFailed``; its batch-mates get exactly the tokens they get alone, and its slot is free. A forward
    that raises is ``StepFailed(committed=False)`` and changes nothing.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from sparseinfer.engine.errors import InvalidRequest, RequestFailed, StepFailed
from sparseinfer.engine.generate import Engine
from sparseinfer.engine.sampling import RequestSampler, SamplingParams, sample_batch_scored
from sparseinfer.model import load_model, load_tokenizer

DOUBLES = st.floats(allow_nan=True, allow_infinity=True, allow_subnormal=True)


@settings(max_examples=400, deadline=None)
@given(
    temperature=DOUBLES,
    top_k=st.integers(-(2**31), 2**31 - 1),
    top_p=DOUBLES,
    penalty=DOUBLES,
    seed=st.integers(0, 2**64 - 1),
    logprobs=st.booleans(),
    scale=st.sampled_from([0.0, 1e-30, 1.0, 1e4, 3e38]),
)
@example(temperature=1e300, top_k=0, top_p=1.0, penalty=1e300, seed=1, logprobs=False, scale=1.0)
@example(temperature=5e-324, top_k=0, top_p=5e-324, penalty=5e-324, seed=1, logprobs=True, scale=3e38)
def test_every_valid_sampling_value_is_computable(temperature, top_k, top_p, penalty, seed, logprobs, scale):
    params = SamplingParams(
        temperature=temperature, top_k=top_k, top_p=top_p, repetition_penalty=penalty, seed=seed,
        logprobs=logprobs,
    )  # fmt: skip
    try:
        params.validate()
    except InvalidRequest as e:
        assert e.field in ("temperature", "top_k", "top_p", "repetition_penalty")
        return
    g = torch.Generator().manual_seed(seed % 2**32)
    vocab = 37
    row = (torch.randn(vocab, generator=g) * scale).clamp(-3.4e38, 3.4e38)
    row[:5] = torch.tensor([0.0, -0.0, 3.4e38, -3.4e38, 1e-45])
    sampler = RequestSampler(params, list(range(0, vocab, 2)))
    ((token, logprob),) = sample_batch_scored(row[None], [sampler])
    assert 0 <= token < vocab
    assert (logprob is not None) == logprobs
    if logprob is not None:
        assert not math.isnan(logprob) and logprob <= 0.0


@pytest.fixture(scope="module")
def generator(tiny_random_checkpoint):
    model = load_model(tiny_random_checkpoint, dtype=torch.float32).eval()
    return Engine(model, load_tokenizer(tiny_random_checkpoint), max_batch=4, max_seq=64)


PROMPTS = ([5, 6, 7], [9, 10], [11, 12, 13, 14])


def _params(i):
    return SamplingParams(max_new_tokens=8, temperature=0.0 if i % 2 else 0.9, seed=100 + i, ignore_eos=True)


def _alone(gen, i):
    return list(gen.generate(PROMPTS[i], _params(i)).token_ids)


def _run_together(gen, poison):
    """Prefill the three prompts together and decode them together; ``poison(seqs)`` runs before the
    third decode step. Returns each sequence and the outcomes it got."""
    seqs = [gen.start(p, _params(i), request_id=i) for i, p in enumerate(PROMPTS)]
    outcomes = {i: [o] for i, o in enumerate(gen.prefill_batch(seqs))}
    step = 0
    while live := [s for s in seqs if not s.finished]:
        step += 1
        if step == 3:
            poison(seqs)
        for seq, outcome in zip(live, gen.decode_step(live), strict=True):
            outcomes[seq.request_id].append(outcome)
    return seqs, outcomes


def _check_isolated(gen, seqs, outcomes, victim):
    assert isinstance(outcomes[victim][-1], RequestFailed) and outcomes[victim][-1].request_id == victim
    assert seqs[victim].error is outcomes[victim][-1] and seqs[victim].slot is None
    assert len(seqs[victim].output_ids) == 3  # prefill + two decode steps before the failure
    for i in range(len(PROMPTS)):
        if i != victim:
            assert [t for o in outcomes[i] for t in o.token_ids] == _alone(gen, i)
    assert gen.free_slots == 4


def test_a_row_with_non_finite_logits_fails_alone(generator, monkeypatch):
    model = generator.model
    forward = model.forward
    poisoned_slot = []

    def nan_for_one_row(tokens, *args, **kwargs):
        logits = forward(tokens, *args, **kwargs)
        if poisoned_slot:  # (B, 1, V): the victim's row becomes NaN, the others are untouched
            slots = kwargs["slots"].tolist()
            if poisoned_slot[0] in slots:
                logits[slots.index(poisoned_slot[0])] = float("nan")
        return logits

    monkeypatch.setattr(model, "forward", nan_for_one_row)
    seqs, outcomes = _run_together(generator, lambda seqs: poisoned_slot.append(seqs[1].slot))
    assert "not finite" in str(outcomes[1][-1])
    monkeypatch.undo()
    _check_isolated(generator, seqs, outcomes, victim=1)


def test_a_row_whose_sampler_raises_fails_alone(generator):
    def break_sampler(seqs):
        def boom(row):
            raise RuntimeError("injected sampler failure")

        seqs[0].sampler.pick = boom

    seqs, outcomes = _run_together(generator, break_sampler)
    assert "injected sampler failure" in str(outcomes[0][-1])
    _check_isolated(generator, seqs, outcomes, victim=0)


def test_a_failed_forward_commits_nothing(generator, monkeypatch):
    seqs = [generator.start(p, _params(i), request_id=i) for i, p in enumerate(PROMPTS)]
    generator.prefill_batch(seqs)
    lengths = generator.cache.lengths.clone()
    tallies = [s.sparsity.report() for s in seqs]

    def boom(*args, **kwargs):
        raise RuntimeError("injected forward failure")

    monkeypatch.setattr(generator.model, "forward", boom)
    with pytest.raises(StepFailed) as err:
        generator.decode_step(seqs)
    assert not err.value.committed and isinstance(err.value.__cause__, RuntimeError)
    assert torch.equal(generator.cache.lengths, lengths)
    assert [s.sparsity.report() for s in seqs] == tallies and all(len(s.output_ids) == 1 for s in seqs)
    monkeypatch.undo()
    generator.decode_step(seqs)  # the same step can be run again
    for s in seqs:
        generator.release(s)
