"""The generation loop against the fake model: cache bookkeeping, EOS, stop strings, budgets, batching."""

import dataclasses

import pytest
import torch
from engine_fakes import BOS, EOS, ByteTokenizer, FakeModel, ScriptedModel, naive_greedy

from sparseinfer.engine import Engine, SamplingParams

GREEDY = SamplingParams(temperature=0.0, max_new_tokens=20)


def _generator(model=None, max_batch=1, max_seq=None):
    return Engine(model or FakeModel(), ByteTokenizer(), max_batch=max_batch, max_seq=max_seq)


def _scripted(text: str, prompt: str = "hi", max_batch: int = 1):
    script = list(text.encode("utf-8"))
    prompt_len = len(ByteTokenizer().encode(prompt))
    return _generator(ScriptedModel(script, prompt_len), max_batch=max_batch), prompt


@pytest.mark.parametrize("prompt", ["a", "hello there", "ünïcödé prompt of some length"])
def test_greedy_matches_naive_no_cache_loop(prompt):
    gen = _generator()
    ids = ByteTokenizer().encode(prompt)
    params = dataclasses.replace(GREEDY, ignore_eos=True)
    result = gen.generate(prompt, params)
    assert list(result.token_ids) == naive_greedy(gen.model, ids, 20, eos=None)
    assert result.finish_reason == "length"
    assert result.prompt_tokens == len(ids) and result.completion_tokens == 20


def test_token_id_prompt_and_stream_events():
    gen = _generator()
    ids = [BOS, 5, 6, 7]
    events = list(gen.generate_stream(ids, GREEDY))
    assert all(len(e.token_ids) == 1 for e in events)
    assert [e.finished for e in events] == [False] * (len(events) - 1) + [True]
    final = events[-1]
    assert final.stats.completion_tokens == len(events)
    assert final.stats.prompt_tokens == 4
    assert 0 <= final.stats.ttft_s <= final.stats.total_s
    assert gen.cache.num_free == 1  # the slot is back


def test_eos_ends_generation_and_ignore_eos_overrides():
    gen, prompt = _scripted("ab")
    result = gen.generate(prompt, GREEDY)
    assert result.finish_reason == "eos"
    assert result.text == "ab"
    assert result.token_ids[-1] == EOS and result.completion_tokens == 3
    more = gen.generate(prompt, dataclasses.replace(GREEDY, ignore_eos=True, max_new_tokens=6))
    assert more.finish_reason == "length" and more.completion_tokens == 6


def test_max_new_tokens_is_exact():
    gen = _generator()
    for n in (1, 2, 7):
        result = gen.generate("x", SamplingParams(temperature=0.0, max_new_tokens=n, ignore_eos=True))
        assert result.completion_tokens == n and result.finish_reason == "length"


def test_stop_string_split_across_tokens_is_not_emitted():
    gen, prompt = _scripted("Hello END world")
    params = dataclasses.replace(GREEDY, stop=("END",))
    events = list(gen.generate_stream(prompt, params))
    assert "".join(e.text for e in events) == "Hello "
    assert events[-1].finish_reason == "stop"
    # The stop string spans three tokens; generation ended on the token that completed it.
    assert events[-1].stats.completion_tokens == len("Hello END")
    assert all("E" not in e.text for e in events)


def test_held_back_text_is_released_when_it_is_not_a_stop():
    gen, prompt = _scripted("an ENTRY ENDS")
    params = dataclasses.replace(GREEDY, stop=("END",), max_new_tokens=40)
    texts = [e.text for e in gen.generate_stream(prompt, params)]
    assert "".join(texts) == "an ENTRY "
    # "EN" of ENTRY was held back (empty events) and released once "T" ruled the stop out.
    i = len("an E")
    assert texts[i - 1 : i + 1] == ["", ""] and texts[i + 1] == "ENT"


def test_held_back_prefix_is_flushed_at_length_and_at_eos():
    gen, prompt = _scripted("abc EN")
    params = dataclasses.replace(GREEDY, stop=("END",))
    assert gen.generate(prompt, params).text == "abc EN"  # EOS after "EN": the prefix is released
    limited = gen.generate(prompt, dataclasses.replace(params, max_new_tokens=5))
    assert limited.text == "abc E" and limited.finish_reason == "length"


def test_earliest_of_several_stops_wins():
    gen, prompt = _scripted("one two three")
    # "two" and "e two" complete on the same token; the text is cut where the earlier one starts.
    result = gen.generate(prompt, dataclasses.replace(GREEDY, stop=("three", "two", "e two")))
    assert result.text == "on" and result.finish_reason == "stop"
    assert gen.generate(prompt, dataclasses.replace(GREEDY, stop=("three", "two"))).text == "one "


def test_multibyte_characters_stream_whole():
    gen, prompt = _scripted("é✓ ok")
    events = list(gen.generate_stream(prompt, GREEDY))
    assert "".join(e.text for e in events) == "é✓ ok"
    assert all("\ufffd" not in e.text for e in events)
    truncated = gen.generate(prompt, dataclasses.replace(GREEDY, max_new_tokens=3))  # é is 2 bytes
    assert truncated.text == "é\ufffd"  # the cut-off 3-byte character is flushed as a replacement char


def test_context_length_is_enforced():
    gen = _generator(FakeModel(max_positions=32))
    with pytest.raises(ValueError, match="max_new_tokens"):
        gen.generate("a" * 10, SamplingParams(max_new_tokens=30))
    ok = gen.generate("a" * 10, SamplingParams(max_new_tokens=21, temperature=0.0, ignore_eos=True))
    assert ok.completion_tokens == 21
    with pytest.raises(ValueError, match="context length"):
        gen.generate("a" * 40, SamplingParams(max_new_tokens=1))


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("temperature", -1.0),
        ("top_p", 0.0),
        ("top_k", -2),
        ("max_new_tokens", 0),
        ("repetition_penalty", 0.0),
    ],
)
def test_bad_params_raise_naming_the_field(field, value):
    gen = _generator()
    params = dataclasses.replace(SamplingParams(), **{field: value})
    with pytest.raises(ValueError, match=field):
        gen.generate("x", params)
    with pytest.raises(ValueError, match=field):
        gen.generate_stream("x", params)  # raises at the call, before iteration
    with pytest.raises(ValueError, match=field):
        gen.generate_batch(["x", "y"], [SamplingParams(max_new_tokens=4), params])
    assert gen.cache.num_free == 1


def test_bad_prompts_raise():
    gen = _generator()
    with pytest.raises(ValueError, match="prompt"):
        gen.generate([], GREEDY)
    with pytest.raises(ValueError, match="prompt"):
        gen.generate([1, 100000], GREEDY)


BATCH_PROMPTS = ["a", "a somewhat longer prompt", "mid length"]


@pytest.mark.parametrize(
    "params",
    [
        [dataclasses.replace(GREEDY, ignore_eos=True, max_new_tokens=n) for n in (12, 5, 9)],
        [
            SamplingParams(temperature=0.9, seed=1, max_new_tokens=12, ignore_eos=True),
            SamplingParams(temperature=1.3, top_k=20, top_p=0.9, seed=2, max_new_tokens=7),
            SamplingParams(temperature=0.0, repetition_penalty=1.4, max_new_tokens=10, ignore_eos=True),
        ],
    ],
    ids=["greedy", "seeded"],
)
@pytest.mark.parametrize("max_batch", [3, 2])
def test_generate_batch_equals_each_alone(params, max_batch):
    alone = [_generator().generate(p, sp) for p, sp in zip(BATCH_PROMPTS, params, strict=True)]
    model = FakeModel()
    batched = _generator(model, max_batch=max_batch).generate_batch(BATCH_PROMPTS, params)
    assert [r.token_ids for r in batched] == [r.token_ids for r in alone]
    assert [r.text for r in batched] == [r.text for r in alone]
    assert [r.finish_reason for r in batched] == [r.finish_reason for r in alone]
    # Decode steps really were batched (B > 1 with T == 1), and the first prompts were prefilled together
    # in one right-padded forward (the prompts differ in length), the last alone once a slot freed up.
    assert max(b for b, t in model.calls if t == 1) == min(max_batch, 3)
    prefills = [b for b, t in model.calls if t > 1]
    assert prefills == ([3] if max_batch == 3 else [2, 1])


def test_generate_batch_sequences_leave_as_they_finish():
    model = FakeModel()
    gen = _generator(model, max_batch=3)
    params = [dataclasses.replace(GREEDY, ignore_eos=True, max_new_tokens=n) for n in (2, 4, 6)]
    gen.generate_batch(["x", "yy", "zzz"], params)
    decode_batches = [b for b, t in model.calls if t == 1]
    # After the prefills (1 token each): 1 step with 3 rows, 2 with 2 rows, 2 with 1 row.
    assert decode_batches == [3, 2, 2, 1, 1]
    assert gen.cache.num_free == 3


def test_closing_a_stream_early_frees_the_slot():
    gen = _generator()
    stream = gen.generate_stream("abc", dataclasses.replace(GREEDY, ignore_eos=True))
    next(stream)
    next(stream)
    assert gen.cache.num_free == 0
    stream.close()
    assert gen.cache.num_free == 1
    assert gen.generate("abc", GREEDY).completion_tokens > 0


def test_step_core_drives_interleaved_requests():
    """What a continuous batcher does: admit a request while another is mid-decode."""
    gen = _generator(max_batch=2)
    params = dataclasses.replace(GREEDY, ignore_eos=True, max_new_tokens=6)
    first = gen.start("first prompt", params)
    gen.prefill(first)
    gen.decode_step([first])
    second = gen.start("2nd", params)
    gen.prefill(second)
    while not (first.finished and second.finished):
        gen.decode_step([s for s in (first, second) if not s.finished])
    expected = [_generator().generate(p, params).token_ids for p in ("first prompt", "2nd")]
    assert [tuple(first.output_ids), tuple(second.output_ids)] == expected
    assert gen.cache.num_free == 2
    with pytest.raises(RuntimeError):
        gen.decode_step([first])


def test_unseeded_result_reports_a_replayable_seed():
    gen = _generator()
    params = SamplingParams(temperature=1.0, max_new_tokens=10, ignore_eos=True)
    first = gen.generate("seed me", params)
    replay = gen.generate("seed me", dataclasses.replace(params, seed=first.seed))
    assert replay.token_ids == first.token_ids


def test_sampling_does_not_touch_global_rng():
    torch.manual_seed(0)
    expected = torch.rand(2)
    torch.manual_seed(0)
    _generator().generate("x", SamplingParams(max_new_tokens=5, seed=3))
    assert torch.equal(torch.rand(2), expected)
