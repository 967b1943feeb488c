"""Helpers of the server tests (``slow_engine`` slows every decode step of a server's engine so that
timing-dependent tests, deadline and shutdown, do not race a model that finishes in milliseconds)."""

from __future__ import annotations

import contextlib
import time


@contextlib.contextmanager
def slow_engine(handle, seconds: float):
    """Make every decode step of ``handle``'s engine take at least ``seconds``; count the steps."""
    engine = handle.batcher.engine
    original = engine.decode_step
    calls = []

    def slow(seqs):
        calls.append(tuple(s.request_id for s in seqs))
        time.sleep(seconds)
        return original(seqs)

    engine.decode_step = slow
    try:
        yield calls
    finally:
        del engine.decode_step  # back to the class's method


def wait_until(predicate, timeout: float = 5.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.01)
    return predicate()


def idle(handle) -> bool:
    """No request is queued or running and every KV-cache slot is free."""
    b = handle.batcher
    return b.queued == 0 and not b._running and b.engine.free_slots == b.limits.max_batch_size


class Spawned:
    """A ``sparseinfer serve`` subprocess: ``proc``, its ``port``, and ``logs()`` (its stderr so far, which
    goes to a file: a pipe nobody reads fills up and blocks the server's logging)."""

    def __init__(self, proc, port: int, log_path) -> None:
        self.proc, self.port, self._log_path = proc, port, log_path

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def logs(self) -> str:
        return self._log_path.read_text()


@contextlib.contextmanager
def spawned_server(checkpoint, *flags: str, env: dict | None = None):
    """``sparseinfer serve --model checkpoint --port 0 flags...`` in a subprocess (the interpreter running the
    tests, so the README's install); yields a ``Spawned`` and kills the server if it still runs after."""
    import os
    import subprocess
    import sys
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as tmp:
        log_path = Path(tmp) / "server.log"
        with open(log_path, "w") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "sparseinfer.cli", "serve", "--model", str(checkpoint), "--port", "0",
                 *flags],
                stdout=subprocess.PIPE, stderr=log, text=True, env={**os.environ, **(env or {})},
            )  # fmt: skip
        try:
            line = proc.stdout.readline()
            assert " on 127.0.0.1:" in line, (line, log_path.read_text())
            yield Spawned(proc, int(line.rsplit(":", 1)[1]), log_path)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            proc.stdout.close()


def rss_bytes(pid: int) -> int:
    """Resident set size of process ``pid`` (Linux /proc)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")
