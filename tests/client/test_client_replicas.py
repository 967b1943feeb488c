"""Several replicas behind one client: gRPC's round_robin spreads the calls, client-side health checking skips
a replica that reports NOT_SERVING, and UNAVAILABLE is retried (on another replica) only while nothing was
delivered. Scripted fake servers, so every call each replica saw is counted on its side."""

from __future__ import annotations

import asyncio
import io
import time

import grpc
import pytest
from client_fakes import FakeServer, start_fake_server
from grpc_health.v1 import health_pb2

import sparseinfer_client as sc
from sparseinfer_client import AsyncClient, Client, RetryPolicy
from sparseinfer_client._targets import HEALTH_SERVICE, channel_target

FAST_RETRY = RetryPolicy(max_attempts=4, initial_backoff_s=0.01, max_backoff_s=0.05, jitter=0.0)
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@pytest.fixture
def replicas():
    servers = [start_fake_server() for _ in range(3)]
    for server in servers:  # the fake's default marks the service NOT_SERVING (for the health() tests)
        server.health.set(HEALTH_SERVICE, SERVING)
    yield servers
    for server in servers:
        server.stop()


def _targets(servers: list[FakeServer]) -> list[str]:
    return [s.target for s in servers]


def _counts(servers: list[FakeServer], method: str = "Tokenize") -> list[int]:
    return [s.servicer.attempts(method) for s in servers]


def _connect_all(client: Client, servers: list[FakeServer]) -> None:
    """round_robin uses a replica once its connection is up and its health watch said SERVING; call until
    every replica has answered once, then forget those calls."""
    end = time.monotonic() + 10
    while min(_counts(servers)) == 0:
        assert time.monotonic() < end, _counts(servers)
        client.tokenize("warm")
    for server in servers:
        server.servicer.calls.clear()


@pytest.mark.parametrize(
    ("target", "grpc_target", "balanced"),
    [
        ("127.0.0.1:50051", "127.0.0.1:50051", False),
        (["127.0.0.1:1"], "127.0.0.1:1", False),
        (["127.0.0.1:1", "10.0.0.2:2"], "ipv4:127.0.0.1:1,10.0.0.2:2", True),
        ("127.0.0.1:1, 10.0.0.2:2", "ipv4:127.0.0.1:1,10.0.0.2:2", True),
        (("[::1]:1", "[fe80::2]:2"), "ipv6:[::1]:1,[fe80::2]:2", True),
        ("dns:///sparseinfer.default.svc:50051", "dns:///sparseinfer.default.svc:50051", True),
        ("ipv4:127.0.0.1:1,127.0.0.1:2", "ipv4:127.0.0.1:1,127.0.0.1:2", True),
        ("unix:/tmp/sparseinfer.sock", "unix:/tmp/sparseinfer.sock", False),
    ],
)
def test_target_spelling(target, grpc_target, balanced):
    chosen = channel_target(target)
    assert (chosen.target, chosen.balanced) == (grpc_target, balanced)
    options = dict(chosen.options())
    if balanced:
        assert '"round_robin"' in options["grpc.service_config"]
        assert f'"serviceName": "{HEALTH_SERVICE}"' in options["grpc.service_config"]
    else:
        assert options == {}
    assert channel_target(target, load_balancing=not balanced).balanced is not balanced


@pytest.mark.parametrize(
    ("target", "message"),
    [
        (["replica-a:50051", "replica-b:50051"], "dns:///"),
        (["127.0.0.1:1", "[::1]:2"], "not both"),
        (["::1:1", "::2:2"], "brackets"),
        (["127.0.0.1:1", "127.0.0.1:1"], "twice"),
        (["127.0.0.1:1", "127.0.0.1:0"], "ip:port"),
        (["127.0.0.1:1", ""], "empty"),
        ([], "no address"),
    ],
)
def test_bad_target_lists_are_refused_before_connecting(target, message):
    with pytest.raises(ValueError, match=message):
        Client(target)


def test_calls_go_round_robin_over_every_replica(replicas):
    with Client(_targets(replicas), timeout=10) as client:
        assert client.load_balanced and client.target.startswith("ipv4:")
        _connect_all(client, replicas)
        for i in range(30):
            client.tokenize(f"t{i}")
    assert _counts(replicas) == [10, 10, 10]


def test_a_not_serving_replica_leaves_the_rotation_and_comes_back(replicas):
    a = replicas[0]
    with Client(_targets(replicas), timeout=10) as client:
        _connect_all(client, replicas)
        a.health.set(HEALTH_SERVICE, NOT_SERVING)  # what the server does when it starts draining
        time.sleep(0.3)  # the health watch stream carries the change to the client
        for i in range(20):
            client.tokenize(f"t{i}")
        assert _counts(replicas) == [0, 10, 10]
        a.health.set(HEALTH_SERVICE, SERVING)
        end = time.monotonic() + 5
        while _counts([a]) == [0]:
            assert time.monotonic() < end, "the replica never came back"
            client.tokenize("again")


def test_draining_replica_finishes_its_stream_while_new_calls_go_elsewhere(replicas):
    a, b, c = replicas
    for server in (b, c):
        server.health.set(HEALTH_SERVICE, NOT_SERVING)
    a.servicer.script.stream_chunks = 6
    a.servicer.script.chunk_delay_s = 0.1
    with Client(_targets(replicas), timeout=10) as client:
        stream = client.generate_stream("long", request_id="long")
        chunks = [next(stream)]  # running on a, the only healthy replica
        a.health.set(HEALTH_SERVICE, NOT_SERVING)
        b.health.set(HEALTH_SERVICE, SERVING)
        time.sleep(0.3)
        assert client.tokenize("new").ids  # a new call: b
        chunks += list(stream)
    assert chunks[-1].finished and len(chunks) == 6
    assert _counts(replicas, "GenerateStream") == [1, 0, 0] and _counts(replicas) == [0, 1, 0]


def test_every_replica_not_serving_is_unavailable(replicas):
    for server in replicas:
        server.health.set(HEALTH_SERVICE, NOT_SERVING)
    with Client(_targets(replicas), retry=FAST_RETRY) as client, pytest.raises(sc.Unavailable):
        client.health(timeout=2)  # health() itself only goes to a healthy replica when balanced
    assert sum(_counts(replicas)) == 0


def test_refused_calls_move_to_another_replica(replicas):
    a, b, _ = replicas
    replicas[2].health.set(HEALTH_SERVICE, NOT_SERVING)
    a.servicer.script.fail_first = [grpc.StatusCode.UNAVAILABLE] * 1000  # a refuses everything
    with Client(_targets(replicas), retry=FAST_RETRY, timeout=10) as client:
        for i in range(10):
            assert client.generate("hi", request_id=f"u{i}").request_id == f"u{i}"
            assert list(client.generate_stream("hi", request_id=f"s{i}"))[-1].finished
    ok_ids = [call[2].request_id for call in b.servicer.calls]
    assert sorted(ok_ids) == sorted([f"u{i}" for i in range(10)] + [f"s{i}" for i in range(10)])
    assert _counts([a], "Generate")[0] + _counts([a], "GenerateStream")[0] > 0  # a was tried, then skipped


def _streams_against_a_replica_that_breaks_mid_stream(replicas, run_streams):
    """a sends one message and then fails UNAVAILABLE; b streams normally; c is out of the rotation. Every
    stream must either complete (b) or raise Unavailable after its one message (a): never be re-run."""
    a, b, c = replicas
    c.health.set(HEALTH_SERVICE, NOT_SERVING)
    a.servicer.script.stream_fail_after = grpc.StatusCode.UNAVAILABLE
    outcomes = run_streams([f"r{i}" for i in range(10)])
    on_a = [call[2].request_id for call in a.servicer.calls if call[0] == "GenerateStream"]
    on_b = [call[2].request_id for call in b.servicer.calls if call[0] == "GenerateStream"]
    assert on_a and on_b and not set(on_a) & set(on_b)  # round_robin used both; no id reached both
    assert sorted(on_a + on_b) == sorted(outcomes)  # one attempt per request: nothing was retried
    for rid, (chunks, error) in outcomes.items():
        if rid in on_a:
            assert isinstance(error, sc.Unavailable) and len(chunks) == 1, rid
        else:
            assert error is None and chunks[-1].finished, rid


def test_a_started_stream_is_never_retried(replicas):
    def run(ids):
        outcomes = {}
        with Client(_targets(replicas), retry=FAST_RETRY, timeout=10) as client:
            for rid in ids:
                chunks, error = [], None
                try:
                    for chunk in client.generate_stream("hi", request_id=rid):
                        chunks.append(chunk)
                except sc.Unavailable as e:
                    error = e
                outcomes[rid] = (chunks, error)
        return outcomes

    _streams_against_a_replica_that_breaks_mid_stream(replicas, run)


def test_async_a_started_stream_is_never_retried(replicas):
    async def go(ids):
        outcomes = {}
        async with AsyncClient(_targets(replicas), retry=FAST_RETRY, timeout=10) as client:
            assert client.load_balanced
            for rid in ids:
                chunks, error = [], None
                try:
                    async for chunk in client.generate_stream("hi", request_id=rid):
                        chunks.append(chunk)
                except sc.Unavailable as e:
                    error = e
                outcomes[rid] = (chunks, error)
        return outcomes

    _streams_against_a_replica_that_breaks_mid_stream(replicas, lambda ids: asyncio.run(go(ids)))


def test_async_client_spreads_and_retries_unary_calls(replicas):
    a, b, c = replicas
    a.servicer.script.fail_first = [grpc.StatusCode.UNAVAILABLE] * 1000

    # 12 calls at once share round_robin's pick order, so one call's 4 attempts can all land on a (seen in
    # about 1 run of 5): the claim is spreading and retrying, not odds, so give each call ample attempts.
    retry = RetryPolicy(max_attempts=16, initial_backoff_s=0.01, max_backoff_s=0.05, jitter=0.0)

    async def go():
        async with AsyncClient(",".join(_targets(replicas)), retry=retry, timeout=10) as client:
            await client.wait_ready(5)
            return await asyncio.gather(*(client.generate("hi", request_id=f"g{i}") for i in range(12)))

    results = asyncio.run(go())
    assert sorted(r.request_id for r in results) == sorted(f"g{i}" for i in range(12))
    assert _counts([b, c], "Generate") != [0, 0] and sum(_counts([b, c], "Generate")) == 12


def test_cli_takes_a_comma_separated_target(replicas):
    from sparseinfer_client.cli import main

    out, err = io.StringIO(), io.StringIO()
    assert main(["--target", ",".join(_targets(replicas)), "health"], out, err) == 0, err.getvalue()
    assert out.getvalue().strip() == "SERVING"
