"""Status → exception mapping for every status, and retries on UNAVAILABLE only (counted on the server)."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest

import sparseinfer_client as sc
from sparseinfer_client import AsyncClient, Client, RetryPolicy
from sparseinfer_client.errors import error_class

FAST_RETRY = RetryPolicy(max_attempts=4, initial_backoff_s=0.01, max_backoff_s=0.05, jitter=0.0)
ERROR_CODES = [code for code in grpc.StatusCode if code != grpc.StatusCode.OK]
EXPECTED = {
    grpc.StatusCode.INVALID_ARGUMENT: sc.ValidationError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: sc.OverloadedError,
    grpc.StatusCode.DEADLINE_EXCEEDED: sc.DeadlineExceeded,
    grpc.StatusCode.UNAUTHENTICATED: sc.Unauthenticated,
    grpc.StatusCode.PERMISSION_DENIED: sc.PermissionDenied,
    grpc.StatusCode.CANCELLED: sc.Cancelled,
    grpc.StatusCode.INTERNAL: sc.ServerError,
    grpc.StatusCode.UNAVAILABLE: sc.Unavailable,
    grpc.StatusCode.UNIMPLEMENTED: sc.Unimplemented,
    grpc.StatusCode.NOT_FOUND: sc.NotFound,
    grpc.StatusCode.ALREADY_EXISTS: sc.AlreadyExists,
    grpc.StatusCode.FAILED_PRECONDITION: sc.FailedPrecondition,
    grpc.StatusCode.ABORTED: sc.Aborted,
    grpc.StatusCode.OUT_OF_RANGE: sc.OutOfRange,
    grpc.StatusCode.DATA_LOSS: sc.DataLoss,
    grpc.StatusCode.UNKNOWN: sc.UnknownError,
}


def test_every_error_status_has_its_own_class():
    assert set(EXPECTED) == set(ERROR_CODES)
    classes = [error_class(code) for code in ERROR_CODES]
    assert len(set(classes)) == len(classes)
    with pytest.raises(ValueError):
        error_class(grpc.StatusCode.OK)


@pytest.mark.parametrize("code", ERROR_CODES, ids=lambda c: c.name)
def test_sync_error_mapping(fake_server, code):
    # UNAVAILABLE would be retried: allow one attempt so the scripted status reaches the caller.
    fake_server.servicer.script.fail_first = [code]
    with Client(fake_server.target, retry=sc.NO_RETRY) as client, pytest.raises(EXPECTED[code]) as info:
        client.generate("hi")
    assert isinstance(info.value, sc.SparseInferError)
    assert info.value.code == code
    assert info.value.details == f"scripted {code.name}"


@pytest.mark.parametrize("code", ERROR_CODES, ids=lambda c: c.name)
def test_async_and_stream_error_mapping(fake_server, code):
    async def run():
        async with AsyncClient(fake_server.target, retry=sc.NO_RETRY) as client:
            fake_server.servicer.script.fail_first = [code]
            with pytest.raises(EXPECTED[code]):
                await client.generate("hi")
            fake_server.servicer.script.fail_first = [code]
            with pytest.raises(EXPECTED[code]):
                async for _ in client.generate_stream("hi"):
                    pass

    asyncio.run(run())
    fake_server.servicer.script.fail_first = [code]
    with Client(fake_server.target, retry=sc.NO_RETRY) as client, pytest.raises(EXPECTED[code]):
        list(client.generate_stream("hi"))


def test_unavailable_is_retried_until_success(fake_server):
    fake_server.servicer.script.fail_first = [grpc.StatusCode.UNAVAILABLE] * 3
    with Client(fake_server.target, retry=FAST_RETRY) as client:
        assert client.generate("hi").text == "hello world"
    assert fake_server.servicer.attempts("Generate") == 4


def test_unavailable_gives_up_after_max_attempts(fake_server):
    fake_server.servicer.script.fail_first = [grpc.StatusCode.UNAVAILABLE] * 10
    with Client(fake_server.target, retry=FAST_RETRY) as client, pytest.raises(sc.Unavailable):
        client.tokenize("x")
    assert fake_server.servicer.attempts("Tokenize") == FAST_RETRY.max_attempts


@pytest.mark.parametrize(
    "code", [c for c in ERROR_CODES if c != grpc.StatusCode.UNAVAILABLE], ids=lambda c: c.name
)
def test_other_statuses_are_not_retried(fake_server, code):
    fake_server.servicer.script.fail_first = [code, code]
    with Client(fake_server.target, retry=FAST_RETRY) as client, pytest.raises(EXPECTED[code]):
        client.generate("hi")
    assert fake_server.servicer.attempts("Generate") == 1


def test_stream_retries_only_before_the_first_message(fake_server):
    script = fake_server.servicer.script
    script.fail_first = [grpc.StatusCode.UNAVAILABLE]
    with Client(fake_server.target, retry=FAST_RETRY) as client:
        chunks = list(client.generate_stream("hi"))
    assert fake_server.servicer.attempts("GenerateStream") == 2
    assert chunks[-1].finished

    script.stream_fail_after = grpc.StatusCode.UNAVAILABLE
    received = []
    with Client(fake_server.target, retry=FAST_RETRY) as client, pytest.raises(sc.Unavailable):
        for chunk in client.generate_stream("hi"):
            received.append(chunk)
    assert len(received) == 1  # the first message arrived, so the call was not re-run
    assert fake_server.servicer.attempts("GenerateStream") == 3


def test_async_unavailable_is_retried(fake_server):
    fake_server.servicer.script.fail_first = [grpc.StatusCode.UNAVAILABLE] * 2

    async def run():
        async with AsyncClient(fake_server.target, retry=FAST_RETRY) as client:
            return [c async for c in client.generate_stream("hi")]

    chunks = asyncio.run(run())
    assert chunks[-1].finished
    assert fake_server.servicer.attempts("GenerateStream") == 3


def test_backoff_grows_exponentially_and_is_capped():
    policy = RetryPolicy(initial_backoff_s=0.1, multiplier=2.0, max_backoff_s=0.5, jitter=0.0)
    assert [policy.backoff(k) for k in (1, 2, 3, 4, 5)] == pytest.approx([0.1, 0.2, 0.4, 0.5, 0.5])
    jittered = RetryPolicy(initial_backoff_s=1.0, jitter=0.5)
    assert all(0.5 <= jittered.backoff(1) <= 1.0 for _ in range(50))
    with pytest.raises(ValueError):
        RetryPolicy(max_attempts=0)


def test_retries_stop_at_the_deadline(fake_server):
    # Backoff 0.3 s per retry but only 0.2 s of deadline: one attempt, then the UNAVAILABLE is raised at once.
    fake_server.servicer.script.fail_first = [grpc.StatusCode.UNAVAILABLE] * 10
    slow = RetryPolicy(max_attempts=10, initial_backoff_s=0.3, jitter=0.0)
    start = time.monotonic()
    with Client(fake_server.target, retry=slow) as client, pytest.raises(sc.Unavailable):
        client.generate("hi", timeout=0.2)
    assert time.monotonic() - start < 0.3
    assert fake_server.servicer.attempts("Generate") == 1


def test_no_server_is_unavailable_after_retries():
    with Client("127.0.0.1:1", retry=FAST_RETRY) as client, pytest.raises(sc.Unavailable):
        client.model_info(timeout=5)
