"""Three replicas of ``sparseinfer serve`` (the bundled model, loopback ports) behind one AsyncClient given
all three targets: a bounded closed-loop load, and SIGTERM to one replica while it is running streams.

What must hold: no request lost or answered twice (every id answered exactly once, complete, at the client,
and finished exactly once across the servers' own request logs), the drained replica finishes the streams it
was running and exits 0, and the load moves on to the two others (their logged request counts grow after the
SIGTERM). The balancing is gRPC's round_robin with client-side health checking: the draining server reports
NOT_SERVING at once, and the SDK retries an UNAVAILABLE that arrives before any message.
"""

from __future__ import annotations

import asyncio
import datetime
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from sparseinfer.model.bundled import bundled_model_path
from sparseinfer_client import AsyncClient, RetryPolicy, SparseInferError

PROMPT = "Once upon a time"
MAX_NEW_TOKENS = 32
REQUESTS = 90
CONCURRENCY = 6
SIGTERM_AFTER = REQUESTS // 3  # requests completed before the replica is stopped
RETRY = RetryPolicy(max_attempts=6, initial_backoff_s=0.05, max_backoff_s=0.5)


@dataclass
class Replica:
    proc: subprocess.Popen
    port: int
    metrics_port: int
    log_path: Path

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def records(self) -> list[dict]:
        """The server's structured log (one JSON object a line; anything else is skipped)."""
        out = []
        for line in self.log_path.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
        return out

    def finished_ok(self, records: list[dict] | None = None) -> list[str]:
        """Ids of the streams this replica answered in full, in the order it finished them."""
        return [
            r["request_id"]
            for r in (self.records() if records is None else records)
            if r.get("message") == "request finished" and r.get("method") == "GenerateStream"
        ]

    def running(self) -> float:
        """Sequences in its running batch right now (its Prometheus gauge)."""
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as response:
            for line in response.read().decode().splitlines():
                if line.startswith("sparseinfer_batch_size "):
                    return float(line.split()[1])
        raise AssertionError("no sparseinfer_batch_size gauge")


def _seconds(log_time: str) -> float:
    """A server log record's "time" (UTC, millisecond precision) in epoch seconds."""
    parsed = datetime.datetime.strptime(log_time, "%Y-%m-%dT%H:%M:%S.%fZ")
    return parsed.replace(tzinfo=datetime.timezone.utc).timestamp()


def _start(count: int, directory: Path) -> list[Replica]:
    """Start ``count`` servers at once (their model loads overlap), then wait for each one's ports."""
    env = {k: v for k, v in os.environ.items() if k not in ("SPARSEINFER_AUTH_TOKEN", "SPARSEINFER_MODEL")}
    started = []
    for i in range(count):
        log_path = directory / f"replica{i}.log"
        with open(log_path, "w") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "sparseinfer.cli", "serve", "--model", str(bundled_model_path()),
                 "--port", "0", "--metrics-port", "0", "--threads", "1", "--grace-period", "30",
                 # fp32: in bf16 a row's rounding depends on its batch-mates, enough to flip a greedy
                 # near-tie, and the check below compares every request's text with every other's.
                 "--dtype", "float32"],
                stdout=subprocess.PIPE, stderr=log, text=True, env=env,
            )  # fmt: skip
        started.append((proc, log_path))
    replicas = []
    try:
        for proc, log_path in started:
            serving, metrics = proc.stdout.readline(), proc.stdout.readline()
            assert " on 127.0.0.1:" in serving and "/metrics" in metrics, (serving, log_path.read_text())
            metrics_port = int(metrics.rsplit(":", 1)[1].split("/")[0])
            replicas.append(Replica(proc, int(serving.rsplit(":", 1)[1]), metrics_port, log_path))
    except BaseException:
        for proc, _ in started:
            proc.kill()
            proc.wait()
        raise
    return replicas


async def _load(replicas: list[Replica], victim: Replica) -> tuple[dict, dict, dict]:
    """The closed loop; returns (chunks by request id, errors by id, counts at the SIGTERM)."""
    others = [r for r in replicas if r is not victim]
    answers: dict[str, list] = {}  # request id -> the chunks its stream yielded
    errors: dict[str, Exception] = {}
    at_sigterm: dict[str, object] = {}
    ids = iter(f"lb-{i}" for i in range(REQUESTS))

    async with AsyncClient([r.address for r in replicas], retry=RETRY, timeout=60) as client:
        assert client.load_balanced
        await client.wait_ready(30)

        async def worker() -> None:
            for rid in ids:  # one shared iterator: each id is sent by exactly one worker, once
                chunks = []
                try:
                    async for chunk in client.generate_stream(
                        PROMPT, max_new_tokens=MAX_NEW_TOKENS, temperature=0.0, ignore_eos=True,
                        request_id=rid, return_tokens=True,
                    ):  # fmt: skip
                        chunks.append(chunk)
                except SparseInferError as e:
                    errors[rid] = e
                answers[rid] = chunks

        async def stop_one_replica() -> None:
            while len(answers) < SIGTERM_AFTER:
                await asyncio.sleep(0.005)
            # Stop it while it runs streams, so that the drain has in-flight work to finish.
            end = time.monotonic() + 20
            while await asyncio.to_thread(victim.running) < 1:
                assert time.monotonic() < end, "the replica never had a stream running"
            victim.proc.send_signal(signal.SIGTERM)
            at_sigterm["others"] = [len(r.finished_ok()) for r in others]
            at_sigterm["answered"] = len(answers)

        await asyncio.wait_for(
            asyncio.gather(stop_one_replica(), *(worker() for _ in range(CONCURRENCY))), timeout=120
        )
    return answers, errors, at_sigterm


def test_sigterm_one_of_three_replicas_loses_and_duplicates_nothing(tmp_path):
    replicas = _start(3, tmp_path)
    victim = replicas[1]
    try:
        answers, errors, at_sigterm = asyncio.run(_load(replicas, victim))
        assert victim.proc.wait(timeout=40) == 0  # the drain completed within its grace period
    finally:
        for r in replicas:
            if r.proc.poll() is None:
                r.proc.send_signal(signal.SIGTERM)
        for r in replicas:
            try:
                r.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                r.proc.kill()
                r.proc.wait()
            r.proc.stdout.close()
    ids = [f"lb-{i}" for i in range(REQUESTS)]

    # The client: every request answered exactly once, in full, with the same greedy text everywhere.
    assert errors == {}
    assert sorted(answers) == sorted(ids)
    texts = set()
    for rid in ids:
        chunks = answers[rid]
        finals = [c for c in chunks if c.finished]
        assert len(finals) == 1 and chunks[-1] is finals[0], rid
        assert finals[0].finish_reason == "length" and finals[0].usage.generated_tokens == MAX_NEW_TOKENS
        assert sum(len(c.tokens) for c in chunks) == MAX_NEW_TOKENS, rid  # no chunk delivered twice
        texts.add("".join(c.text for c in chunks))
    assert len(texts) == 1

    # The servers: each id finished exactly once across the three (no request ran to the end twice).
    records = [r.records() for r in replicas]
    served = [r.finished_ok(log) for r, log in zip(replicas, records, strict=True)]
    assert Counter(rid for ids_of_one in served for rid in ids_of_one) == Counter(ids)
    assert all(served), "round_robin left a replica without work"

    # The drained replica finished the streams it was running when the signal came, and took no new ones.
    log = records[replicas.index(victim)]
    draining = next(i for i, r in enumerate(log) if r.get("message") == "draining")
    after = [r for r in log[draining:] if r.get("message", "").startswith("request ")]
    assert after, "no stream was in flight at the SIGTERM"
    assert all(r["code"] == "OK" and r["finish_reason"] == "length" for r in after if "finish_reason" in r)
    finished_in_drain = [r for r in after if r["message"] == "request finished"]
    refused = [r for r in after if r["message"] == "request failed"]
    assert finished_in_drain and all(r["code"] == "UNAVAILABLE" for r in refused)  # refused ones were retried
    # Each one had arrived before the drain began: its log time minus its server-side duration is at most
    # its arrival time plus the logging delay (0.2 s allows for a loaded machine; these streams take ~0.2 s).
    drain_began = _seconds(log[draining]["time"])
    assert all(_seconds(r["time"]) - r["total_s"] < drain_began + 0.2 for r in finished_in_drain)

    # The traffic moved: both other replicas finished more requests after the SIGTERM than before it.
    others = [len(ids_of_one) for r, ids_of_one in zip(replicas, served, strict=True) if r is not victim]
    grown = [now - before for now, before in zip(others, at_sigterm["others"], strict=True)]
    assert all(g > 0 for g in grown), grown
    assert sum(grown) >= REQUESTS - at_sigterm["answered"] - CONCURRENCY
