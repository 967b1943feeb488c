"""Client behaviour against the scripted fake server: conversions to dataclasses, request encoding, auth
metadata, deadlines, stream iteration and cancellation, the asyncio client, health."""

from __future__ import annotations

import asyncio
import dataclasses
import time

import pytest
from google.protobuf.message import Message

import sparseinfer_client as sc
from sparseinfer_client import AsyncClient, Client
from sparseinfer_client._proto import sparseinfer_pb2 as pb


def walk(value):
    """Every value reachable from a dataclass / tuple tree."""
    yield value
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        for f in dataclasses.fields(value):
            yield from walk(getattr(value, f.name))
    elif isinstance(value, (tuple, list)):
        for item in value:
            yield from walk(item)


def assert_plain(value):
    for item in walk(value):
        assert not isinstance(item, Message), type(item)
        assert type(item).__module__.split(".")[0] in ("builtins", "sparseinfer_client"), type(item)
        assert "_proto" not in type(item).__module__
        if dataclasses.is_dataclass(item):
            assert type(item).__dataclass_params__.frozen


def test_generate_result_is_plain_frozen_dataclasses(fake_server):
    with Client(fake_server.target) as client:
        result = client.generate("hi", return_logprobs=True, seed=7, request_id="r1")
    assert_plain(result)
    assert result.request_id == "r1"
    assert result.text == "hello world"
    assert result.finish_reason == "length"
    assert result.seed == 7
    assert [t.id for t in result.tokens] == [10, 11]
    assert [t.logprob for t in result.tokens] == [-0.5, -1.0]
    assert result.usage == sc.Usage(prompt_tokens=3, generated_tokens=2)
    assert result.timings.total_s == pytest.approx(0.007)
    report = result.sparsity
    assert report.mode == "predicted" and report.tokens == 7 and report.computed_share == 0.25
    assert report.layers[0] == sc.LayerSparsity(0.1, 0.05, 0.9)
    assert report.layers[1].true_active_share is None and report.layers[1].recall is None
    assert (report.ffn_bytes_read, report.ffn_bytes_dense) == (1000, 4000)
    with pytest.raises(dataclasses.FrozenInstanceError):
        result.text = "x"


def test_request_encoding(fake_server):
    with Client(fake_server.target) as client:
        client.generate(
            [5, 6, 7],
            max_new_tokens=9,
            temperature=0,
            top_k=3,
            top_p=0.5,
            repetition_penalty=1.2,
            seed=0,
            stop=("\n", "END"),
            ignore_eos=True,
            sparsity_mode="oracle",
            return_tokens=True,
        )
        client.generate("plain")
    (_, _, full), (_, _, plain) = fake_server.servicer.calls
    assert full.WhichOneof("prompt") == "token_ids" and list(full.token_ids.ids) == [5, 6, 7]
    # Explicit zeros are sent as set (temperature 0 = greedy, seed 0 is a seed), unset stays unset.
    assert full.sampling.HasField("temperature") and full.sampling.temperature == 0.0
    assert full.sampling.HasField("seed") and full.sampling.seed == 0
    assert (full.sampling.top_k, full.sampling.top_p, full.sampling.repetition_penalty) == (3, 0.5, 1.2)
    assert full.stopping.max_new_tokens == 9 and list(full.stopping.stop_sequences) == ["\n", "END"]
    assert full.stopping.ignore_eos and full.sparsity_mode == pb.SPARSITY_MODE_ORACLE
    assert full.details.tokens and not full.details.logprobs
    assert plain.WhichOneof("prompt") == "text" and plain.text == "plain"
    for name in ("temperature", "top_k", "top_p", "repetition_penalty", "seed"):
        assert not plain.sampling.HasField(name), name
    assert not plain.stopping.HasField("max_new_tokens")
    assert plain.sparsity_mode == pb.SPARSITY_MODE_UNSPECIFIED and plain.request_id == ""


@pytest.mark.parametrize(
    ("prompt", "options", "field"),
    [
        (3.5, {}, "prompt"),
        ([1, -1], {}, "prompt"),
        ("x", {"sparsity_mode": "sparse"}, "sparsity_mode"),
        ("x", {"seed": -1}, "sampling.seed"),
        ("x", {"max_new_tokens": 2**40}, "stopping.max_new_tokens"),
        ("x", {"temperature": "hot"}, "sampling.temperature"),
        ("x", {"stop": "END"}, "stopping.stop_sequences"),
    ],
)
def test_unencodable_requests_fail_before_sending(fake_server, prompt, options, field):
    with Client(fake_server.target) as client, pytest.raises(sc.ValidationError, match=field) as info:
        client.generate(prompt, **options)
    assert info.value.code == sc.ValidationError.default_code
    assert fake_server.servicer.calls == []


@pytest.mark.parametrize("interval", [-1, 2**32, 1.5, True])
def test_a_bad_stream_interval_fails_before_sending(fake_server, interval):
    with Client(fake_server.target) as client, pytest.raises(sc.ValidationError, match="stream_interval"):
        client.generate_stream("x", stream_interval=interval)
    assert fake_server.servicer.calls == []


def test_auth_token_is_sent_as_bearer_metadata(fake_server):
    with Client(fake_server.target, token="s3cret") as client:
        client.generate("hi")
        list(client.generate_stream("hi"))
        client.model_info()
    for _, metadata, _ in fake_server.servicer.calls:
        assert metadata["authorization"] == "Bearer s3cret"
    with Client(fake_server.target) as client:
        client.tokenize("a")
    assert "authorization" not in fake_server.servicer.calls[-1][1]
    with pytest.raises(ValueError):
        Client(fake_server.target, token="a\nb")


def test_timeout_raises_deadline_exceeded(fake_server):
    fake_server.servicer.script.delay_s = 1.0
    with Client(fake_server.target, timeout=0.2) as client:
        start = time.monotonic()
        with pytest.raises(sc.DeadlineExceeded):
            client.generate("hi")  # the client-wide default timeout
        assert time.monotonic() - start < 0.9
        with pytest.raises(sc.DeadlineExceeded):
            client.tokenize("hi", timeout=0.1)  # per call
        assert client.model_info(timeout=5).model_id == "fake"  # a per-call timeout overrides the default
    with pytest.raises(ValueError):
        Client(fake_server.target, timeout=0)


def test_stream_iteration_and_final_chunk(fake_server):
    with Client(fake_server.target) as client:
        chunks = list(client.generate_stream("hi", request_id="s1"))
    assert [c.text for c in chunks] == ["t0 ", "t1 ", "t2 "]
    assert all(c.request_id == "s1" for c in chunks)
    assert [c.finished for c in chunks] == [False, False, True]
    assert chunks[0].usage is None and chunks[0].sparsity is None
    assert chunks[-1].finish_reason == "length" and chunks[-1].sparsity.computed_share == 0.25
    assert_plain(chunks)


def test_breaking_out_of_a_stream_cancels_the_call(fake_server):
    # 200 chunks × 50 ms: the stream would end by itself only after 10 s.
    fake_server.servicer.script.stream_chunks = 200
    fake_server.servicer.script.chunk_delay_s = 0.05
    with Client(fake_server.target) as client:
        stream = client.generate_stream("hi")
        first = next(stream)
        assert first.text == "t0 "
        stream.close()
        assert fake_server.servicer.cancelled.wait(2.0), "server never saw the cancellation"


def test_async_client_all_calls(fake_server):
    async def run():
        async with AsyncClient(fake_server.target, token="t") as client:
            await client.wait_ready(5)
            result = await client.generate("hi", return_tokens=True)
            chunks = [c async for c in client.generate_stream("hi")]
            tokens = await client.tokenize("ab")
            info = await client.model_info()
            health = await client.health()
            many = await asyncio.gather(*(client.generate("x", seed=i) for i in range(8)))
            return result, chunks, tokens, info, health, many

    result, chunks, tokens, info, health, many = asyncio.run(run())
    assert_plain((result, chunks, tokens, info))
    assert result.text == "hello world" and [t.text for t in result.tokens] == ["hello", " world"]
    assert result.tokens[0].logprob is None
    assert "".join(c.text for c in chunks) == "t0 t1 t2 " and chunks[-1].finished
    assert tokens == sc.TokenizeResult((97, 98), ("a", "b"))
    assert info.available_sparsity_modes == ("dense", "oracle") and info.predictor_recall is None
    assert info.cett_target == pytest.approx(0.2) and info.neurons_per_layer == (128, 128)
    assert health == "SERVING"
    assert sorted(r.seed for r in many) == list(range(8))


def test_async_stream_early_exit_cancels(fake_server):
    fake_server.servicer.script.stream_chunks = 200
    fake_server.servicer.script.chunk_delay_s = 0.05

    async def run():
        async with AsyncClient(fake_server.target) as client:
            stream = client.generate_stream("hi")
            async for _ in stream:
                break
            await stream.aclose()

    asyncio.run(run())
    assert fake_server.servicer.cancelled.wait(2.0)


def test_health_and_model_info(fake_server):
    with Client(fake_server.target) as client:
        client.wait_ready(5)
        assert client.health() == "SERVING"
        assert client.health("sparseinfer.v1.SparseInfer") == "NOT_SERVING"
        with pytest.raises(sc.NotFound):
            client.health("no.such.Service")
        info = client.model_info()
    assert_plain(info)
    assert info.limits.max_batch_size == 8 and info.placement.hot_device == "cpu"
    assert info.default_sparsity_mode == "dense"


def test_wait_ready_without_server():
    with Client("127.0.0.1:1") as client, pytest.raises(sc.Unavailable):
        client.wait_ready(0.3)
