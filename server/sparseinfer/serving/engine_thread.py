"""The one thread that runs the server's torch work: loading the model, then the batcher's loop.

Why one: torch's CPU ops run their parallel regions on OpenMP (libgomp), which keeps a separate worker pool
for every thread that opens a region. Load the model on the main thread and decode on another, and the
process holds two pools: libgomp then counts more threads than cores and lets idle workers sleep after ~1000
spins instead of ~300,000, so every parallel op of the next step pays a futex wake-up: a batch-1 decode
step of the bundled model took over 3× longer (benchmarks/results/README.md, "Design measurements").
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, TypeVar

T = TypeVar("T")


class EngineThread:
    """A daemon thread that runs submitted callables one after another, in order.

    Daemon, like the engine thread it replaces: a server that was never shut down must not keep the
    interpreter from exiting.
    """

    def __init__(self, name: str = "sparseinfer-engine") -> None:
        self._jobs: queue.SimpleQueue[tuple[Callable[[], Any], Future[Any]] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            fn, future = job
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn())
            except BaseException as e:  # handed to whoever waits on the future
                future.set_exception(e)

    def submit(self, fn: Callable[[], T]) -> Future[T]:
        """Queue ``fn``; its future completes when it has run."""
        future: Future[T] = Future()
        self._jobs.put((fn, future))
        return future

    def call(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on the engine thread and return its result (or raise its exception) here."""
        return self.submit(fn).result()

    def stop(self, timeout: float | None = None) -> None:
        """Let the queued callables finish, then end the thread (waiting up to ``timeout`` seconds)."""
        self._jobs.put(None)
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout)
