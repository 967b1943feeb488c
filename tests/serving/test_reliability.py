"""Deadlines, overload, engine failures, auth, TLS and draining, against real servers on port 0."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import grpc
import pytest
from serving_helpers import idle, slow_engine, spawned_server, wait_until

from sparseinfer.engine.errors import StepFailed
from sparseinfer.serving.config import Limits
from sparseinfer_client import (
    NO_RETRY,
    Client,
    DeadlineExceeded,
    OverloadedError,
    ServerError,
    Unauthenticated,
    Unavailable,
)
from sparseinfer_client._proto import sparseinfer_pb2 as pb
from sparseinfer_client._proto import sparseinfer_pb2_grpc as pb_grpc

LONG = dict(max_new_tokens=150, ignore_eos=True, temperature=0.0)


def test_deadline_stops_the_work(server):
    with Client(server.address, retry=NO_RETRY) as c, slow_engine(server, 0.01) as steps:
        t0 = time.monotonic()
        with pytest.raises(DeadlineExceeded):
            c.generate("too slow", timeout=0.3, request_id="late", **LONG)
        assert time.monotonic() - t0 < 1.0
        assert wait_until(lambda: idle(server), timeout=1.0)
        n = len(steps)
        time.sleep(0.1)
        assert len(steps) == n  # nothing is decoding for it any more
        assert 0 < sum(1 for s in steps if "late" in s) < 149


def background(fn):
    """Run ``fn`` on a daemon thread, ignoring its error (tests end such calls by closing their client)."""

    def run():
        with contextlib.suppress(Exception):
            fn()

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def test_full_queue_answers_resource_exhausted_at_once(make_server):
    handle = make_server(limits=Limits(max_batch_size=1, max_queue=1, max_new_tokens=200))
    bg = Client(handle.address, retry=NO_RETRY)
    with Client(handle.address, retry=NO_RETRY) as c, slow_engine(handle, 0.01):
        threads = [background(lambda: bg.generate("one", **LONG))]
        assert wait_until(lambda: len(handle.batcher._running) == 1)
        threads.append(background(lambda: bg.generate("two", **LONG)))  # waits in the queue
        assert wait_until(lambda: handle.batcher.queued == 1)
        t0 = time.monotonic()
        with pytest.raises(OverloadedError):
            c.generate("three", max_new_tokens=2)
        assert time.monotonic() - t0 < 0.5
        bg.close()  # cancels both calls: their slot and queue place come back
        for t in threads:
            t.join(5)
        assert wait_until(lambda: idle(handle), timeout=2.0)


def test_engine_exception_fails_only_that_request(server):
    engine = server.batcher.engine
    original = engine.prefill_batch

    def flaky(seqs):  # fails the way the engine's forward does: typed, nothing committed
        if any(seq.request_id == "boom" for seq in seqs):
            raise StepFailed("prefill", False, RuntimeError("injected engine failure"))
        return original(seqs)

    engine.prefill_batch = flaky
    try:
        with Client(server.address, retry=NO_RETRY) as c:
            results = {}

            def run(rid):
                try:
                    results[rid] = c.generate("x", request_id=rid, max_new_tokens=20, ignore_eos=True)
                except Exception as e:
                    results[rid] = e

            threads = [threading.Thread(target=run, args=(rid,)) for rid in ("a", "boom", "b")]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            assert isinstance(results["boom"], ServerError) and "injected" in results["boom"].details
            assert results["a"].usage.generated_tokens == results["b"].usage.generated_tokens == 20
            assert c.generate("after", max_new_tokens=3).usage.generated_tokens >= 1
    finally:
        del engine.prefill_batch
    assert wait_until(lambda: idle(server))


def test_bearer_token_auth(make_server):
    handle = make_server(auth_token="s3cret")
    with Client(handle.address, retry=NO_RETRY) as anonymous:
        with pytest.raises(Unauthenticated):
            anonymous.generate("hi", max_new_tokens=2)
        with pytest.raises(Unauthenticated):
            list(anonymous.generate_stream("hi", max_new_tokens=2))
        assert anonymous.health() == "SERVING"  # probes need no token
    with Client(handle.address, token="wrong", retry=NO_RETRY) as wrong, pytest.raises(Unauthenticated):
        wrong.model_info()
    with Client(handle.address, token="s3cret", retry=NO_RETRY) as ok:
        assert ok.generate("hi", max_new_tokens=2).usage.generated_tokens >= 1


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl for a test certificate")
def test_tls(make_server, tmp_path):
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", cert,
         "-days", "1", "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
        check=True, capture_output=True,
    )  # fmt: skip
    handle = make_server(tls_cert=cert, tls_key=key)
    target = f"localhost:{handle.port}"
    with Client(target, root_certificates=cert, retry=NO_RETRY) as c:
        assert c.generate("secure", max_new_tokens=3).usage.generated_tokens >= 1
    with Client(target, retry=NO_RETRY, timeout=2) as plaintext, pytest.raises(Unavailable):
        plaintext.generate("plain", max_new_tokens=3)


def test_shutdown_completes_in_flight_streams(make_server):
    handle = make_server()
    with Client(handle.address, retry=NO_RETRY) as c, slow_engine(handle, 0.005):
        chunks = []
        first = threading.Event()

        def consume():
            for chunk in c.generate_stream("drain me", max_new_tokens=60, ignore_eos=True):
                chunks.append(chunk)
                first.set()

        t = threading.Thread(target=consume)
        t.start()
        assert first.wait(5)
        stopper = threading.Thread(target=handle.stop, kwargs={"grace": 10.0})
        stopper.start()
        assert wait_until(lambda: not handle.batcher._accepting)
        with pytest.raises(Unavailable):
            c.generate("new work", max_new_tokens=2)
        t.join(10)
        stopper.join(10)
        assert not stopper.is_alive()  # the drain ended once the stream was done, well before the grace
    assert chunks[-1].finish_reason == "length" and chunks[-1].usage.generated_tokens == 60


def test_past_the_grace_period_running_requests_end_cancelled(make_server):
    handle = make_server()
    with Client(handle.address, retry=NO_RETRY) as c, slow_engine(handle, 0.01):
        chunks = []
        t = threading.Thread(target=lambda: chunks.extend(c.generate_stream("long", **LONG)))
        t.start()
        assert wait_until(lambda: len(chunks) >= 2)
        handle.stop(grace=0.1)
        t.join(5)
    assert chunks[-1].finish_reason == "cancelled" and 0 < chunks[-1].usage.generated_tokens < 150


def test_sigterm_drains_and_exits(tiny_llama_checkpoint):
    env = {**os.environ, "SPARSEINFER_AUTH_TOKEN": "tok"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "sparseinfer.cli", "serve", "--model", str(tiny_llama_checkpoint),
         "--port", "0", "--grace-period", "30"],  # 120 tokens take ~1 s alone, > 5 s on a loaded machine
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip
    try:
        line = proc.stdout.readline()
        assert " on 127.0.0.1:" in line, (line, proc.stderr.read() if proc.poll() is not None else "")
        port = int(line.rsplit(":", 1)[1])
        with Client(f"127.0.0.1:{port}", token="tok", retry=NO_RETRY) as c:
            chunks = []
            stream = c.generate_stream("sigterm", max_new_tokens=120, ignore_eos=True)
            chunks.append(next(stream))
            proc.send_signal(signal.SIGTERM)
            chunks.extend(stream)  # the in-flight stream still completes
        assert chunks[-1].finish_reason == "length" and chunks[-1].usage.generated_tokens == 120
        assert proc.wait(timeout=45) == 0
        logs = proc.stderr.read()
        assert '"message": "draining"' in logs and '"message": "stopped"' in logs
        assert '"message": "request finished", "request_id": ' in logs
    finally:
        if proc.poll() is None:
            proc.kill()


def test_keepalive_pings_do_not_kill_a_long_silent_generation(server):
    # A unary call sends nothing until it ends. A client pinging every 0.2 s without limit (far more often
    # than the server's 10 s minimum) must neither be told to go away (too_many_pings) nor have its call cut.
    options = [
        ("grpc.keepalive_time_ms", 200),
        ("grpc.keepalive_timeout_ms", 5000),
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.http2.min_time_between_pings_ms", 100),
        ("grpc.keepalive_permit_without_calls", 1),
    ]
    request = pb.GenerateRequest(text="silent")
    request.stopping.max_new_tokens = 50
    request.stopping.ignore_eos = True
    with grpc.insecure_channel(server.address, options=options) as channel, slow_engine(server, 0.05):
        response = pb_grpc.SparseInferStub(channel).Generate(request, timeout=30)
    assert response.usage.generated_tokens == 50 and response.timings.total_s > 2.0


def test_a_second_sigterm_while_draining_exits_promptly(tiny_llama_checkpoint):
    """The first SIGTERM drains; a second one ends the drain at once: running streams end with finish reason
    CANCELLED and what they generated, and the process exits with 128 + SIGTERM after saying so in its log."""
    with spawned_server(tiny_llama_checkpoint, "--grace-period", "60") as server:
        with Client(server.address, retry=NO_RETRY, timeout=60) as c:
            streams = [c.generate_stream(f"drain {i}", max_new_tokens=200, ignore_eos=True) for i in range(6)]
            chunks = [[next(s)] for s in streams]
            server.proc.send_signal(signal.SIGTERM)
            time.sleep(0.05)
            server.proc.send_signal(signal.SIGTERM)
            t0 = time.monotonic()
            for got, s in zip(chunks, streams, strict=True):
                got.extend(s)
            assert server.proc.wait(timeout=10) == 128 + signal.SIGTERM
            assert time.monotonic() - t0 < 5.0
        logs = server.logs()
    assert all(
        got[-1].finish_reason == "cancelled" and got[-1].usage.generated_tokens < 200 for got in chunks
    )
    assert '"message": "second stop signal while draining' in logs and '"message": "stopped"' in logs
