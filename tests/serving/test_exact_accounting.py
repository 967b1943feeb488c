"""Every request that ends is logged and counted exactly once, whatever ended it; malformed messages are
answered INVALID_ARGUMENT; gauges read 0 when idle (reliability issue, items 4 and 5)."""

from __future__ import annotations

import contextlib
import logging
import random
import threading
import time

import grpc
import pytest
from serving_helpers import idle, slow_engine, wait_until

from sparseinfer_client._proto import sparseinfer_pb2 as pb

SERVICE = "/sparseinfer.v1.SparseInfer/"
LOGGER = "sparseinfer.serving.requests"


def counted(handle, method: str, code: str) -> float:
    value = handle.server.metrics.registry.get_sample_value(
        "sparseinfer_requests_total", {"method": method, "code": code}
    )
    return value or 0.0


def logged(caplog, **fields) -> list[logging.LogRecord]:
    return [
        r
        for r in caplog.records
        if r.name == LOGGER and all(getattr(r, k, None) == v for k, v in fields.items())
    ]


def _invalid_utf8(message) -> bytes:
    """``message`` serialized with its text field's first byte replaced by 0xFF (not UTF-8)."""
    raw = bytearray(message.SerializeToString())
    raw[raw.index(b"hello")] = 0xFF
    return bytes(raw)


MALFORMED = [
    ("Generate", b"\xff\xff\xff\xff", "unary"),
    ("Generate", _invalid_utf8(pb.GenerateRequest(text="hello")), "unary"),
    ("GenerateStream", b"\x0a\x05ab", "stream"),  # a string field 5 bytes long with 2 bytes left
    ("GenerateStream", _invalid_utf8(pb.GenerateRequest(text="hello")), "stream"),
    ("Tokenize", _invalid_utf8(pb.TokenizeRequest(text="hello")), "unary"),
    ("ModelInfo", b"\x08", "unary"),  # a tag with no value
]


@pytest.mark.parametrize(
    ("method", "raw", "kind"), MALFORMED, ids=[f"{m}-{i}" for i, (m, _, _) in enumerate(MALFORMED)]
)
def test_a_malformed_message_is_invalid_argument_logged_and_counted(make_server, caplog, method, raw, kind):
    caplog.set_level(logging.INFO, logger=LOGGER)
    handle = make_server()
    with grpc.insecure_channel(handle.address) as channel:
        call = (channel.unary_unary if kind == "unary" else channel.unary_stream)(SERVICE + method)
        with pytest.raises(grpc.RpcError) as err:
            result = call(raw, timeout=10)
            if kind == "stream":
                list(result)
    details = err.value.details()
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, details
    assert details.startswith("request: is not a valid sparseinfer.v1.") and "Error" not in details, details
    assert counted(handle, method, "INVALID_ARGUMENT") == 1
    assert len(logged(caplog, method=method, code="INVALID_ARGUMENT")) == 1


def test_gauges_read_zero_when_idle(make_server):
    handle = make_server()
    from sparseinfer_client import NO_RETRY, Client

    with Client(handle.address, retry=NO_RETRY) as c:
        threads = [
            threading.Thread(target=c.generate, args=(f"gauge {i}",), kwargs={"max_new_tokens": 20})
            for i in range(4)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
    assert wait_until(lambda: idle(handle))
    time.sleep(0.05)
    registry = handle.server.metrics.registry
    assert registry.get_sample_value("sparseinfer_batch_size") == 0
    assert registry.get_sample_value("sparseinfer_queue_length") == 0


def test_every_request_is_counted_and_logged_once_whatever_ends_it(make_server, caplog):
    """Streams cancelled at random moments (before they are admitted, mid-stream, right at the end), unary
    calls whose deadline passes, and calls that complete: each one exactly one counter increment and one log
    line, under its own request id."""
    caplog.set_level(logging.INFO, logger=LOGGER)
    handle = make_server()
    # Which requests reached the batcher: a call cancelled before the server ran its handler is one the
    # server never saw (nothing to count); every one it saw must be counted and logged.
    seen, submit = [], handle.batcher.submit

    async def recording_submit(request):
        seen.append(request.request_id)
        return await submit(request)

    handle.batcher.submit = recording_submit
    rng = random.Random(0)
    n_stream, n_unary = 150, 50
    with grpc.insecure_channel(handle.address) as channel, slow_engine(handle, 0.001):
        stream = channel.unary_stream(
            SERVICE + "GenerateStream",
            request_serializer=pb.GenerateRequest.SerializeToString,
            response_deserializer=pb.GenerateStreamResponse.FromString,
        )
        unary = channel.unary_unary(
            SERVICE + "Generate",
            request_serializer=pb.GenerateRequest.SerializeToString,
            response_deserializer=pb.GenerateResponse.FromString,
        )

        def request(rid):
            r = pb.GenerateRequest(text=f"count me {rid}", request_id=rid)
            r.stopping.max_new_tokens = rng.randint(1, 30)
            r.stopping.ignore_eos = True
            return r

        def cancel_stream(rid, after):
            call = stream(request(rid), timeout=30)
            threading.Timer(after, call.cancel).start()
            with contextlib.suppress(grpc.RpcError):
                for _ in call:
                    pass

        def short_deadline(rid, timeout):
            with contextlib.suppress(grpc.RpcError):
                unary(request(rid), timeout=timeout)

        threads = [
            threading.Thread(target=cancel_stream, args=(f"s{i}", rng.uniform(0.002, 0.06)))
            for i in range(n_stream)
        ] + [
            threading.Thread(target=short_deadline, args=(f"u{i}", rng.uniform(0.005, 0.08)))
            for i in range(n_unary)
        ]
        rng.shuffle(threads)
        for i, t in enumerate(threads):
            t.start()
            if i % 16 == 15:
                time.sleep(0.01)
        for t in threads:
            t.join(60)
        assert wait_until(lambda: idle(handle), timeout=10)
        time.sleep(0.2)  # the last handlers' `finally` blocks
    del handle.batcher.submit
    codes = ("OK", "CANCELLED", "DEADLINE_EXCEEDED", "INVALID_ARGUMENT", "INTERNAL", "UNAVAILABLE",
             "RESOURCE_EXHAUSTED")  # fmt: skip
    for method, n, prefix in (("GenerateStream", n_stream, "s"), ("Generate", n_unary, "u")):
        ids = [r.request_id for r in logged(caplog, method=method)]
        assert len(ids) == len(set(ids)), sorted(i for i in ids if ids.count(i) > 1)  # nothing logged twice
        missing = {i for i in seen if i.startswith(prefix)} - set(ids)
        assert not missing, missing  # ... nothing the server saw left out
        assert sum(counted(handle, method, code) for code in codes) == len(ids)  # and counted as logged
        print(method, f"{len(ids)} of {n} reached the server", flush=True)
    assert len(seen) > 0.4 * (n_stream + n_unary), len(seen)  # many reached it, at every stage
    registry = handle.server.metrics.registry
    assert registry.get_sample_value("sparseinfer_batch_size") == 0
    assert registry.get_sample_value("sparseinfer_queue_length") == 0
