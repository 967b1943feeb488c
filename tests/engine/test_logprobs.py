"""Per-token log-probabilities (``SamplingParams.logprobs``): checked against transformers' logits processors
(sampler level) and against the model's own no-cache forward (generator level); asking for them never changes
tokens, and a request's values do not depend on its batch neighbours."""

import dataclasses

import pytest
import torch

from sparseinfer.engine import Engine
from sparseinfer.engine.sampling import RequestSampler, SamplingParams, sample_batch, sample_batch_scored
from sparseinfer.model import load_model, load_tokenizer

hf = pytest.importorskip("transformers.generation.logits_process")

PARAMS = [
    SamplingParams(temperature=0.0),  # plain greedy: the batched argmax fast path
    SamplingParams(temperature=0.0, repetition_penalty=1.5),
    SamplingParams(temperature=1.0, seed=1),
    SamplingParams(temperature=0.7, top_k=10, seed=2),
    SamplingParams(temperature=1.3, top_p=0.8, repetition_penalty=1.2, seed=3),
    SamplingParams(temperature=0.9, top_k=5, top_p=0.5, seed=4),
]
PROMPT_IDS = [1, 2, 3]


def _oracle_logprobs(row, params, seen_ids):
    """log_softmax of the distribution sampled from, built with transformers' processors in generate()'s
    order (greedy: the penalty alone)."""
    scores = row.clone().unsqueeze(0)  # (1, V)
    input_ids = torch.tensor([seen_ids])  # (1, L)
    if params.repetition_penalty != 1.0:
        scores = hf.RepetitionPenaltyLogitsProcessor(params.repetition_penalty)(input_ids, scores)
    if params.temperature != 0.0:
        if params.temperature != 1.0:
            scores = hf.TemperatureLogitsWarper(params.temperature)(input_ids, scores)
        if params.top_k > 0:
            scores = hf.TopKLogitsWarper(params.top_k)(input_ids, scores)
        if params.top_p < 1.0:
            scores = hf.TopPLogitsWarper(params.top_p)(input_ids, scores)
    return torch.log_softmax(scores[0], dim=-1)  # (V,)


def _run(params_list, rows):
    """Drive samplers over ``rows`` (steps, B, V) together; returns per-request (tokens, logprobs)."""
    samplers = [RequestSampler(p, PROMPT_IDS) for p in params_list]
    out = [([], []) for _ in params_list]
    for step in range(rows.shape[0]):
        for b, (token, logprob) in enumerate(sample_batch_scored(rows[step], samplers)):
            samplers[b].observe(token)
            out[b][0].append(token)
            out[b][1].append(logprob)
    return out


@pytest.mark.parametrize("params", PARAMS, ids=[str(i) for i in range(len(PARAMS))])
def test_logprobs_match_transformers_processors(params):
    rows = torch.randn(20, 1, 64, generator=torch.Generator().manual_seed(5)) * 3  # (steps, 1, V)
    ((tokens, logprobs),) = _run([dataclasses.replace(params, logprobs=True)], rows)
    seen = list(PROMPT_IDS)
    for step, (token, logprob) in enumerate(zip(tokens, logprobs, strict=True)):
        expected = float(_oracle_logprobs(rows[step, 0], params, seen)[token])
        assert logprob == pytest.approx(expected, abs=1e-5)
        assert logprob <= 0.0 and logprob > float("-inf")  # the drawn token always has mass
        seen.append(token)


def test_temperature_1_without_filters_is_log_softmax_of_raw_logits():
    rows = torch.randn(15, 1, 40, generator=torch.Generator().manual_seed(9))  # (steps, 1, V)
    ((tokens, logprobs),) = _run([SamplingParams(temperature=1.0, seed=8, logprobs=True)], rows)
    raw = [float(torch.log_softmax(rows[s, 0], -1)[t]) for s, t in enumerate(tokens)]
    assert logprobs == pytest.approx(raw, abs=1e-6)


def test_logprobs_change_no_tokens_and_are_batch_independent():
    rows = torch.randn(25, len(PARAMS), 64, generator=torch.Generator().manual_seed(3))  # (steps, B, V)
    without = _run(PARAMS, rows)
    assert all(lp is None for _, lps in without for lp in lps)  # not requested: not computed
    wanted = [dataclasses.replace(p, logprobs=True) for p in PARAMS]
    together = _run(wanted, rows)
    assert [t for t, _ in together] == [t for t, _ in without]
    for b, p in enumerate(wanted):
        assert _run([p], rows[:, b : b + 1]) == [together[b]]
    # Mixed: only the rows that asked get values, and nobody's tokens move.
    mixed = [p if b % 2 else dataclasses.replace(p, logprobs=True) for b, p in enumerate(PARAMS)]
    got = _run(mixed, rows)
    assert [t for t, _ in got] == [t for t, _ in without]
    assert [all(lp is None for lp in lps) for _, lps in got] == [bool(b % 2) for b in range(len(PARAMS))]
    assert sample_batch(rows[0], [RequestSampler(p, PROMPT_IDS) for p in wanted]) == [
        t[0] for t, _ in without
    ]


def test_validate_rejects_non_bool_logprobs():
    with pytest.raises(ValueError, match="logprobs"):
        SamplingParams(logprobs=1).validate()


# ---- the generator on a real model ------------------------------------------------------------------


@pytest.fixture(scope="module")
def llama(tiny_llama_checkpoint):
    return load_model(tiny_llama_checkpoint), load_tokenizer(tiny_llama_checkpoint)


def _forward_logprobs(model, ids, new_ids):
    """log_softmax of the no-cache forward's logits at each generated token: the model's own probability."""
    full = torch.tensor([list(ids) + list(new_ids)])  # (1, T)
    with torch.inference_mode():
        logits = model(full)[0, len(ids) - 1 : -1].float()  # (n, V): the positions that predicted new_ids
    return torch.log_softmax(logits, -1).gather(-1, torch.tensor(new_ids)[:, None])[:, 0].tolist()


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=0.0, max_new_tokens=12, ignore_eos=True),
        SamplingParams(temperature=1.0, seed=21, max_new_tokens=12, ignore_eos=True),
    ],
    ids=["greedy", "temperature-1"],
)
def test_generator_logprobs_match_the_models_forward(llama, params):
    model, tok = llama
    gen = Engine(model, tok, max_seq=64)
    prompt = "The quick brown fox"
    plain = gen.generate(prompt, params)
    scored = gen.generate(prompt, dataclasses.replace(params, logprobs=True))
    assert plain.logprobs == () and scored.token_ids == plain.token_ids
    assert len(scored.logprobs) == len(scored.token_ids)
    expected = _forward_logprobs(model, tok.encode(prompt), list(scored.token_ids))
    assert list(scored.logprobs) == pytest.approx(expected, abs=1e-4)
    events = list(gen.generate_stream(prompt, dataclasses.replace(params, logprobs=True)))
    assert all(len(e.logprobs) == len(e.token_ids) for e in events)
    assert tuple(lp for e in events for lp in e.logprobs) == scored.logprobs


def test_generator_batch_logprobs_equal_each_alone(llama):
    model, tok = llama
    params = [
        SamplingParams(temperature=0.0, max_new_tokens=9, ignore_eos=True, logprobs=True),
        SamplingParams(temperature=0.8, top_k=50, seed=5, max_new_tokens=6, ignore_eos=True, logprobs=True),
        SamplingParams(temperature=1.0, seed=6, max_new_tokens=7, ignore_eos=True),
    ]
    prompts = ["A", "Most neurons stay quiet", "The quick brown fox"]
    gen = Engine(model, tok, max_batch=3, max_seq=64)
    batch = gen.generate_batch(prompts, params)
    for prompt, p, result in zip(prompts, params, batch, strict=True):
        alone = gen.generate(prompt, p)
        assert result.token_ids == alone.token_ids
        assert list(result.logprobs) == pytest.approx(list(alone.logprobs), abs=1e-4)
    assert batch[2].logprobs == ()
