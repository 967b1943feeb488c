"""The real server through the real client: generation, batching independence, health, reflection, metrics.

The oracle for generated tokens is the engine itself driven directly (``Engine.generate``, no server),
and for batching the same request run alone through the server.
"""

from __future__ import annotations

import threading
import urllib.request

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from serving_helpers import idle, wait_until

from sparseinfer.engine.generate import Engine
from sparseinfer.engine.sampling import SamplingParams
from sparseinfer.model import load_model, load_tokenizer
from sparseinfer_client import NO_RETRY, Client


def test_unary_matches_the_engine_alone(client, tiny_llama_checkpoint):
    model, tok = load_model(tiny_llama_checkpoint), load_tokenizer(tiny_llama_checkpoint)
    params = SamplingParams(max_new_tokens=12, temperature=0.8, top_k=40, seed=7, ignore_eos=True)
    expected = Engine(model, tok, max_seq=64).generate("Hello there", params)
    got = client.generate(
        "Hello there",
        max_new_tokens=12,
        temperature=0.8,
        top_k=40,
        seed=7,
        ignore_eos=True,
        return_tokens=True,
    )
    assert [t.id for t in got.tokens] == list(expected.token_ids)
    assert got.text == expected.text and got.seed == 7
    assert got.finish_reason == "length"
    assert got.usage.prompt_tokens == expected.prompt_tokens and got.usage.generated_tokens == 12
    assert [t.text for t in got.tokens] == [tok.decode([i]) for i in expected.token_ids]
    # The report of a dense request: everything computed, counted over prompt + generated tokens - 1
    # (the last sampled token is never fed back).
    r = got.sparsity
    assert r.mode == "dense" and r.computed_share == 1.0 and r.tokens == got.usage.prompt_tokens + 11
    assert len(r.layers) == 2 and r.ffn_bytes_read == r.ffn_bytes_dense > 0
    t = got.timings
    assert 0 <= t.queue_s <= t.ttft_s <= t.total_s and t.per_token_s > 0


def test_stream_concatenates_to_the_unary_result(client):
    kwargs = dict(max_new_tokens=20, temperature=1.0, seed=3, ignore_eos=True, return_tokens=True)
    whole = client.generate("stream me", **kwargs)
    chunks = list(client.generate_stream("stream me", **kwargs))
    assert all(c.finish_reason is None for c in chunks[:-1])
    assert all(len(c.tokens) == 1 for c in chunks)  # one message per step, the last one included
    last = chunks[-1]
    assert last.finish_reason == "length" and last.usage == whole.usage and last.seed == 3
    assert "".join(c.text for c in chunks) == whole.text
    assert [t.id for c in chunks for t in c.tokens] == [t.id for t in whole.tokens]
    assert last.sparsity.tokens == whole.sparsity.tokens


def test_a_stream_interval_sends_fewer_messages_with_the_same_tokens(client):
    kwargs = dict(max_new_tokens=11, temperature=1.0, seed=5, ignore_eos=True, return_logprobs=True)
    each = list(client.generate_stream("chunk me", **kwargs))
    chunked = list(client.generate_stream("chunk me", stream_interval=4, **kwargs))
    # The first token at once, then 4 per message: tokens 1 | 2-5 | 6-9 | 10-11 with the finish.
    assert [len(c.tokens) for c in chunked] == [1, 4, 4, 2]
    assert [c.finish_reason for c in chunked] == [None, None, None, "length"]
    assert [t for c in chunked for t in c.tokens] == [t for c in each for t in c.tokens]  # ids, logprobs
    assert "".join(c.text for c in chunked) == "".join(c.text for c in each)
    assert chunked[-1].usage == each[-1].usage and chunked[-1].sparsity == each[-1].sparsity


def test_32_concurrent_requests_equal_single_runs(server, client):
    requests = [
        dict(
            prompt=f"request number {i} " * (1 + i % 4),
            max_new_tokens=8 + i % 9,
            temperature=0.0 if i % 3 == 0 else 0.9,
            top_p=0.9 if i % 2 else 1.0,
            seed=1000 + i,
            ignore_eos=i % 5 != 0,
        )
        for i in range(32)
    ]

    def run(kw):
        kw = dict(kw)
        return client.generate(kw.pop("prompt"), return_tokens=True, **kw)

    singles = [run(kw) for kw in requests]
    results: list = [None] * 32
    barrier = threading.Barrier(32)

    def worker(i):
        barrier.wait()
        results[i] = run(requests[i])

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(32)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for single, batched in zip(singles, results, strict=True):
        assert [t.id for t in batched.tokens] == [t.id for t in single.tokens]
        assert batched.text == single.text and batched.finish_reason == single.finish_reason
        assert batched.sparsity == single.sparsity  # the report counts the request's own rows only
    # They really were batched: some waited for a slot (8 slots, 32 requests).
    assert max(r.timings.queue_s for r in results) > 0
    assert wait_until(lambda: idle(server))


def test_tokenize_and_model_info(client, tiny_llama_checkpoint):
    tok = load_tokenizer(tiny_llama_checkpoint)
    result = client.tokenize("héllo")
    assert list(result.ids) == tok.encode("héllo")
    assert list(result.pieces) == [tok.decode([i]) for i in result.ids]
    info = client.model_info()
    assert info.num_layers == 2 and info.hidden_size == 64 and list(info.neurons_per_layer) == [128, 128]
    assert info.vocab_size == 512 and info.dtype == "float32" and info.activation == "silu"
    assert info.limits.max_batch_size == 8 and info.limits.max_new_tokens == 200
    assert info.default_sparsity_mode == "dense"


def test_health_and_reflection(server):
    with grpc.insecure_channel(server.address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for name in ("", "sparseinfer.v1.SparseInfer"):
            status = health.Check(health_pb2.HealthCheckRequest(service=name), timeout=5).status
            assert status == health_pb2.HealthCheckResponse.SERVING
        refl = reflection_pb2_grpc.ServerReflectionStub(channel)
        responses = refl.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")])
        )
        names = {s.name for r in responses for s in r.list_services_response.service}
        assert {"sparseinfer.v1.SparseInfer", "grpc.health.v1.Health"} <= names


def test_cancelling_a_stream_frees_its_slot(server, client):
    stream = client.generate_stream("cancel me", max_new_tokens=200, ignore_eos=True, temperature=0.0)
    for i, _chunk in enumerate(stream):
        if i == 2:
            break
    stream.close()
    assert wait_until(lambda: idle(server), timeout=2.0)


def test_metrics_endpoint(make_server):
    handle = make_server(metrics_port=0)
    with Client(handle.address, retry=NO_RETRY) as c:
        c.generate("metrics", max_new_tokens=5, ignore_eos=True)
        with pytest.raises(Exception):  # noqa: B017 (any client error: counted as INVALID_ARGUMENT)
            c.generate("", max_new_tokens=5)
    text = (
        urllib.request.urlopen(f"http://127.0.0.1:{handle.metrics_port}/metrics", timeout=5).read().decode()
    )
    assert 'sparseinfer_requests_total{code="OK",method="Generate"} 1.0' in text
    assert 'sparseinfer_requests_total{code="INVALID_ARGUMENT",method="Generate"} 1.0' in text
    assert "sparseinfer_generated_tokens_total 5.0" in text
    assert 'sparseinfer_served_computed_tokens_total{mode="dense"}' in text
    for name in ("queue_length", "batch_size", "time_to_first_token_seconds", "inter_token_latency_seconds"):
        assert f"sparseinfer_{name}" in text


@pytest.mark.parametrize("kind", ["uvloop", "asyncio"])
def test_both_event_loops_serve_streams_and_drain(make_server, kind):
    handle = make_server(event_loop=kind)
    assert type(handle._loop).__module__.split(".")[0] == kind
    with Client(handle.address, retry=NO_RETRY, timeout=30) as c:
        chunks = list(c.generate_stream("loop", max_new_tokens=6, seed=1, ignore_eos=True))
        assert chunks[-1].finish_reason == "length" and len(chunks) == 6
        stream = c.generate_stream("drain", max_new_tokens=150, seed=2, ignore_eos=True)
        first = next(stream)  # in flight when the server is asked to stop
        stopper = threading.Thread(target=handle.stop, kwargs={"grace": 10.0})
        stopper.start()
        rest = list(stream)
        stopper.join()
    assert first.finish_reason is None and rest[-1].finish_reason == "length" and 1 + len(rest) == 150
