"""Sampling: validation, logits processing against transformers' processors, seeds and batch independence."""

import dataclasses

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sparseinfer.engine.sampling import (
    RequestSampler,
    SamplingParams,
    UnsampleableRow,
    process_logits,
    sample_batch,
    sample_batch_scored,
)

hf = pytest.importorskip("transformers.generation.logits_process")


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("temperature", -0.1),
        ("temperature", float("nan")),
        ("top_p", 0.0),
        ("top_p", 1.5),
        ("top_k", -1),
        ("max_new_tokens", 0),
        ("max_new_tokens", -3),
        ("repetition_penalty", 0.0),
        ("repetition_penalty", -1.0),
        ("stop", ("ok", "")),
        ("seed", 1.5),
    ],
)
def test_validate_names_the_field(field, value):
    params = dataclasses.replace(SamplingParams(), **{field: value})
    with pytest.raises(ValueError, match=field if field != "stop" else "stop"):
        params.validate()


def test_validate_limit_and_defaults():
    assert SamplingParams().validate() == SamplingParams()
    with pytest.raises(ValueError, match="max_new_tokens"):
        SamplingParams(max_new_tokens=10).validate(max_new_tokens_limit=5)
    SamplingParams(max_new_tokens=5).validate(max_new_tokens_limit=5)


def _hf_process(logits, params, seen_ids):
    """transformers' processors in generate()'s order: the independent oracle."""
    scores = logits.clone().unsqueeze(0)  # (1, V)
    input_ids = torch.tensor([seen_ids])  # (1, L)
    if params.repetition_penalty != 1.0:
        scores = hf.RepetitionPenaltyLogitsProcessor(params.repetition_penalty)(input_ids, scores)
    if params.temperature not in (0.0, 1.0):
        scores = hf.TemperatureLogitsWarper(params.temperature)(input_ids, scores)
    if params.temperature != 0.0 and params.top_k > 0:
        scores = hf.TopKLogitsWarper(params.top_k)(input_ids, scores)
    if params.temperature != 0.0 and params.top_p < 1.0:
        scores = hf.TopPLogitsWarper(params.top_p)(input_ids, scores)
    return scores[0]


def _seen_mask(seen_ids, vocab):
    mask = torch.zeros(vocab, dtype=torch.bool)
    mask[torch.tensor(seen_ids, dtype=torch.long)] = True
    return mask


@settings(max_examples=150, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    vocab=st.sampled_from([2, 7, 50, 1000]),
    temperature=st.sampled_from([0.0, 0.3, 1.0, 1.7]),
    top_k=st.sampled_from([0, 1, 3, 40]),
    top_p=st.sampled_from([1.0, 0.95, 0.5, 0.1]),
    penalty=st.sampled_from([1.0, 1.3, 0.7]),
)
def test_process_logits_matches_transformers(seed, vocab, temperature, top_k, top_p, penalty):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(vocab, generator=g) * 3
    seen = torch.randint(0, vocab, (int(torch.randint(1, 20, (1,), generator=g)),), generator=g).tolist()
    params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, repetition_penalty=penalty)
    ours = process_logits(logits, params, _seen_mask(seen, vocab) if penalty != 1.0 else None)
    torch.testing.assert_close(ours, _hf_process(logits, params, seen))
    # A batch of identical rows is processed exactly like one row.
    batched = process_logits(logits.repeat(3, 1), params, _seen_mask(seen, vocab).repeat(3, 1))
    torch.testing.assert_close(batched, ours.repeat(3, 1))


def test_process_logits_does_not_modify_input():
    logits = torch.randn(20)
    before = logits.clone()
    process_logits(logits, SamplingParams(top_k=3, top_p=0.5, temperature=0.5), None)
    process_logits(logits, SamplingParams(temperature=0), None)
    assert torch.equal(logits, before)


def _draw(params, rows, prompt=(1, 2, 3)):
    sampler = RequestSampler(params, list(prompt))
    out = []
    for row in rows:
        (token,) = sample_batch(row.unsqueeze(0), [sampler])
        sampler.observe(token)
        out.append(token)
    return out


def _random_rows(n, vocab=64, seed=0):
    return list(torch.randn(n, vocab, generator=torch.Generator().manual_seed(seed)))


def test_same_seed_same_tokens_and_seed_is_recorded():
    rows = _random_rows(30)
    params = SamplingParams(temperature=1.0, seed=1234)
    assert _draw(params, rows) == _draw(params, rows)
    assert _draw(params, rows) != _draw(dataclasses.replace(params, seed=99), rows)
    unseeded = RequestSampler(SamplingParams(), [1])
    replay = SamplingParams(seed=unseeded.seed)
    assert _draw(replay, rows) == _draw(replay, rows)


def test_sampling_leaves_global_rng_alone():
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    _draw(SamplingParams(temperature=1.0, seed=5), _random_rows(10))
    _draw(SamplingParams(temperature=1.0), _random_rows(10))
    assert torch.equal(torch.rand(3), expected)


def test_batch_independence():
    """Each row's tokens equal what that request draws alone, whatever its neighbours are."""
    steps, vocab = 25, 64
    params = [
        SamplingParams(temperature=0.8, top_k=10, seed=1),
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=1.2, top_p=0.9, repetition_penalty=1.3, seed=2),
        SamplingParams(temperature=0.0, repetition_penalty=1.5),
        SamplingParams(temperature=1.0, seed=1),  # same seed as row 0, different params
    ]
    rows = torch.randn(steps, len(params), vocab, generator=torch.Generator().manual_seed(3))
    alone = [_draw(p, list(rows[:, b])) for b, p in enumerate(params)]

    samplers = [RequestSampler(p, [1, 2, 3]) for p in params]
    together = [[] for _ in params]
    for step in range(steps):
        tokens = sample_batch(rows[step], samplers)
        for b, token in enumerate(tokens):
            samplers[b].observe(token)
            together[b].append(token)
    assert together == alone


def test_greedy_and_top_k_1_are_argmax():
    rows = _random_rows(10)
    argmax = [int(r.argmax()) for r in rows]
    assert _draw(SamplingParams(temperature=0.0), rows) == argmax
    assert _draw(SamplingParams(temperature=2.0, top_k=1, seed=3), rows) == argmax


def test_repetition_penalty_discourages_seen_tokens():
    row = torch.zeros(5)
    row[2] = 1.0
    row[3] = 0.9
    params = SamplingParams(temperature=0.0, repetition_penalty=2.0)
    assert _draw(params, [row], prompt=[2]) == [3]
    assert _draw(params, [row], prompt=[0]) == [2]


def test_sample_frequencies_follow_softmax():
    logits = torch.tensor([0.0, 1.0, 2.0, -1.0])
    sampler = RequestSampler(SamplingParams(temperature=1.0, seed=0), [])
    n = 6000
    counts = torch.bincount(torch.tensor([sampler.sample_row(logits) for _ in range(n)]), minlength=4)
    expected = logits.softmax(0) * n
    assert torch.all((counts - expected).abs() < 5 * expected.sqrt() + 5), (counts, expected)


def test_sample_batch_rejects_mismatched_rows():
    with pytest.raises(ValueError):
        sample_batch(torch.randn(2, 5), [RequestSampler(SamplingParams(), [])])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_only_rows_without_a_distribution_are_unsampleable(dtype):
    """The finite-sum shortcut and the full test together: NaN, +inf or no finite value fails the row alone;
    -inf entries (masked tokens) and finite values whose sum overflows are still sampled."""
    big = torch.finfo(dtype).max
    inf, nan = float("inf"), float("nan")
    rows = torch.tensor(
        [
            [0.0, 1.0, 2.0, 3.0],
            [0.0, nan, 5.0, 1.0],
            [0.0, inf, 1.0, 2.0],
            [-inf, -inf, -inf, -inf],
            [-inf, 1.0, -inf, 0.5],
            [big, big, big, 0.0],
        ]
    ).to(dtype)
    samplers = [RequestSampler(SamplingParams(temperature=0.0), []) for _ in range(len(rows))]
    out = sample_batch_scored(rows, samplers)
    failed = [isinstance(o, UnsampleableRow) for o in out]
    assert failed == [False, True, True, True, False, False]
    assert [o[0] for o, f in zip(out, failed, strict=True) if not f] == [3, 1, 0]


@pytest.mark.parametrize(("temperature", "penalty"), [(2e-156, 1.0), (1.0, 1e-300), (1e-45, 1e-300)])
def test_extreme_but_valid_parameters_never_sample_nan(temperature, penalty):
    # Regression: dividing ordinary logits by 2e-156 (or by a 1e-300 penalty) overflowed to +inf and the
    # softmax turned the row into NaN, which crashed torch.multinomial.
    logits = torch.tensor([3.0, -1.0, 2.5, 0.0])
    params = SamplingParams(temperature=temperature, repetition_penalty=penalty, seed=0).validate()
    sampler = RequestSampler(params, prompt_ids=[0, 2])
    token = sampler.sample_row(logits)
    assert token in (0, 2)  # the two largest (penalised) logits; never an error
