"""Every invalid field answers INVALID_ARGUMENT naming it (raw stubs: the client cannot pre-empt the server),
and fuzzed requests only ever yield a valid response or INVALID_ARGUMENT while the server stays healthy."""

from __future__ import annotations

import math

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from serving_helpers import idle, wait_until

from sparseinfer_client._proto import sparseinfer_pb2 as pb
from sparseinfer_client._proto import sparseinfer_pb2_grpc as pb_grpc


def req(**kw) -> pb.GenerateRequest:
    r = pb.GenerateRequest(text=kw.pop("text", "hi"))
    r.stopping.max_new_tokens = kw.pop("max_new_tokens", 4)
    for name in ("temperature", "top_k", "top_p", "repetition_penalty", "seed"):
        if name in kw:
            setattr(r.sampling, name, kw.pop(name))
    r.stopping.stop_sequences.extend(kw.pop("stop", []))
    r.stopping.ignore_eos = kw.pop("ignore_eos", False)
    for name, value in kw.items():
        setattr(r, name, value)
    return r


def ids(values) -> pb.GenerateRequest:
    r = pb.GenerateRequest(token_ids=pb.TokenIds(ids=values))
    r.stopping.max_new_tokens = 4
    return r


INVALID = [
    (pb.GenerateRequest(), "prompt"),
    (req(text=""), "prompt"),
    (ids([]), "prompt"),
    (ids([5, 600]), "prompt"),  # vocab is 512
    (req(text="x" * 400), "prompt"),  # longer than the 256-token context
    (req(max_new_tokens=0), "stopping.max_new_tokens"),
    (req(max_new_tokens=-3), "stopping.max_new_tokens"),
    (req(max_new_tokens=201), "stopping.max_new_tokens"),  # over the server's limit (200)
    (req(text="x" * 200, max_new_tokens=100), "stopping.max_new_tokens"),  # prompt + new > context
    (req(temperature=-0.1), "sampling.temperature"),
    (req(temperature=math.nan), "sampling.temperature"),
    (req(top_p=0.0), "sampling.top_p"),
    (req(top_p=1.5), "sampling.top_p"),
    (req(top_k=-1), "sampling.top_k"),
    (req(repetition_penalty=0.0), "sampling.repetition_penalty"),
    (req(repetition_penalty=-2.0), "sampling.repetition_penalty"),
    (req(repetition_penalty=math.inf), "sampling.repetition_penalty"),
    (req(stop=["a"] * 9), "stopping.stop_sequences"),
    (req(stop=["x" * 65]), "stopping.stop_sequences[0]"),
    (req(stop=["ok", ""]), "stopping.stop_sequences[1]"),
    (req(sparsity_mode=7), "sparsity_mode"),
    (req(sparsity_mode=pb.SPARSITY_MODE_PREDICTED), "sparsity_mode"),  # no sidecar for this model
    (req(request_id="r" * 129), "request_id"),
]


@pytest.mark.parametrize(("request_", "field"), INVALID, ids=[f"{f}-{i}" for i, (_, f) in enumerate(INVALID)])
@pytest.mark.parametrize("method", ["Generate", "GenerateStream"])
def test_invalid_field_is_named(stub, request_, field, method):
    with pytest.raises(grpc.RpcError) as err:
        result = getattr(stub, method)(request_, timeout=10)
        if method == "GenerateStream":
            list(result)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details().startswith(f"{field}:"), err.value.details()


def _forward_logprobs(model, ids, new_ids):
    """Oracle: log_softmax of the model's no-cache forward at each generated token (no server, no cache)."""
    with torch.inference_mode():
        logits = model(torch.tensor([list(ids) + list(new_ids)]))[0, len(ids) - 1 : -1].float()  # (n, V)
    return torch.log_softmax(logits, -1).gather(-1, torch.tensor(new_ids)[:, None])[:, 0].tolist()


def test_extreme_but_valid_sampling_values_are_served(stub):
    """A positive temperature or penalty however small is valid: the sampler keeps such rows finite (a
    vanishing temperature is argmax, so it must give the greedy tokens)."""
    greedy = stub.Generate(
        req(text="The quick brown fox", max_new_tokens=8, ignore_eos=True, temperature=0.0)
    )
    tiny = stub.Generate(
        req(text="The quick brown fox", max_new_tokens=8, ignore_eos=True, temperature=1e-150)
    )
    assert tiny.text == greedy.text and tiny.usage.generated_tokens == 8
    crushed = stub.Generate(
        req(text="The quick brown fox", max_new_tokens=8, ignore_eos=True, repetition_penalty=1e-300, seed=3)
    )
    assert crushed.usage.generated_tokens == 8


@pytest.mark.parametrize("sampling", [{"temperature": 0.0}, {"temperature": 1.0, "seed": 17}])
def test_logprobs_match_the_models_own_distribution(stub, tiny_llama_checkpoint, sampling):
    """Greedy: log_softmax of the raw logits; temperature 1 without filters: the same distribution sampled."""
    from sparseinfer.model import load_model, load_tokenizer

    plain = req(text="The quick brown fox", max_new_tokens=10, ignore_eos=True, **sampling)
    plain.details.tokens = True
    scored = pb.GenerateRequest()
    scored.CopyFrom(plain)
    scored.details.tokens = False
    scored.details.logprobs = True  # implies tokens
    without = stub.Generate(plain, timeout=20)
    unary = stub.Generate(scored, timeout=20)
    streamed = [t for m in stub.GenerateStream(scored, timeout=20) for t in m.tokens]

    ids = [t.id for t in unary.tokens]
    assert ids == [t.id for t in without.tokens] == [t.id for t in streamed] and len(ids) == 10
    assert not any(t.HasField("logprob") for t in without.tokens)
    assert all(t.HasField("logprob") for t in list(unary.tokens) + streamed)
    logprobs = [t.logprob for t in unary.tokens]
    assert logprobs == [t.logprob for t in streamed]
    assert all(lp <= 0.0 for lp in logprobs)
    model, tok = load_model(tiny_llama_checkpoint), load_tokenizer(tiny_llama_checkpoint)
    assert logprobs == pytest.approx(_forward_logprobs(model, tok.encode(plain.text), ids), abs=1e-4)


FINISH = {pb.FINISH_REASON_LENGTH, pb.FINISH_REASON_EOS, pb.FINISH_REASON_STOP_SEQUENCE}
any_float = st.floats(allow_nan=True, allow_infinity=True, width=64)


def mostly(good, bad):
    """Valid values 7 times in 8, so that a request with several fields is still often valid."""
    return st.integers(0, 7).flatmap(lambda k: bad if k == 0 else good)


@st.composite
def fuzzed_requests(draw):
    r = pb.GenerateRequest()
    if draw(st.booleans()):
        r.text = draw(mostly(st.text(min_size=1, max_size=40), st.text(max_size=300)))
    else:
        r.token_ids.ids.extend(
            draw(
                mostly(
                    st.lists(st.integers(0, 511), min_size=1, max_size=20),
                    st.lists(st.integers(0, 2**32 - 1), max_size=300),
                )
            )
        )
        r.token_ids.SetInParent()
    fields = {
        "temperature": mostly(st.floats(0.0, 3.0), any_float),
        "top_p": mostly(st.floats(0.01, 1.0), any_float),
        "repetition_penalty": mostly(st.floats(0.5, 2.0), any_float),
        "top_k": mostly(st.integers(0, 600), st.integers(-(2**31), -1)),
        "seed": st.integers(0, 2**64 - 1),
    }
    for name, strategy in fields.items():
        if draw(st.booleans()):
            setattr(r.sampling, name, draw(strategy))
    # Always set: the default (128 tokens) would blow the test's time budget.
    r.stopping.max_new_tokens = draw(mostly(st.integers(1, 12), st.integers(-(2**31), 2**31 - 1)))
    r.stopping.stop_sequences.extend(
        draw(mostly(st.lists(st.text(min_size=1, max_size=4), max_size=2), st.lists(st.text(max_size=70))))
    )
    r.stopping.ignore_eos = draw(st.booleans())
    r.sparsity_mode = draw(mostly(st.sampled_from([0, 1]), st.sampled_from([2, 3, 9, -4])))
    r.request_id = draw(mostly(st.text(max_size=20), st.text(max_size=200)))
    r.details.tokens = draw(st.booleans())
    r.details.logprobs = draw(st.booleans())
    r.stream_interval = draw(mostly(st.integers(0, 6), st.integers(0, 2**32 - 1)))
    return r


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(request_=fuzzed_requests())
def test_fuzzed_requests_get_a_valid_answer_or_invalid_argument(stub, request_, server):
    try:
        response = stub.Generate(request_, timeout=20)
    except grpc.RpcError as e:
        assert e.code() == grpc.StatusCode.INVALID_ARGUMENT, (e.code(), e.details())
        assert e.details().split(":")[0]  # names a field
        event(f"INVALID_ARGUMENT {e.details().split(':')[0]}")
        return
    event("OK")
    assert response.finish_reason in FINISH
    assert 0 < response.usage.generated_tokens <= request_.stopping.max_new_tokens
    assert response.sparsity.mode == pb.SPARSITY_MODE_DENSE and response.sparsity.computed_share == 1.0
    if request_.details.tokens or request_.details.logprobs:
        assert len(response.tokens) == response.usage.generated_tokens
    assert all(t.HasField("logprob") == request_.details.logprobs for t in response.tokens)
    assert all(t.logprob <= 0.0 for t in response.tokens)
    if request_.request_id:
        assert response.request_id == request_.request_id


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(request_=fuzzed_requests())
def test_fuzzed_streams_get_valid_messages_or_invalid_argument(stub, request_, server):
    try:
        messages = list(stub.GenerateStream(request_, timeout=20))
    except grpc.RpcError as e:
        assert e.code() == grpc.StatusCode.INVALID_ARGUMENT, (e.code(), e.details())
        return
    *chunks, last = messages
    assert last.finish_reason in FINISH and all(
        m.finish_reason == pb.FINISH_REASON_UNSPECIFIED for m in chunks
    )
    n = last.usage.generated_tokens
    # The first token at once, then one message per `stream_interval` tokens (0 means 1), the rest last.
    interval = max(1, request_.stream_interval)
    assert len(chunks) == sum(1 for k in range(1, n) if (k - 1) % interval == 0)
    if request_.details.tokens or request_.details.logprobs:
        assert sum(len(m.tokens) for m in messages) == n


def test_server_healthy_after_fuzzing(server):
    assert wait_until(lambda: idle(server))
    with grpc.insecure_channel(server.address) as channel:
        status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5).status
        assert status == health_pb2.HealthCheckResponse.SERVING
        r = pb_grpc.SparseInferStub(channel).Generate(req(max_new_tokens=3, ignore_eos=True), timeout=10)
    assert r.usage.generated_tokens >= 1
