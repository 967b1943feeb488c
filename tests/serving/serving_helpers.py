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
