"""Continuous batching over the engine's step API, on one dedicated engine thread.

The asyncio side awaits ``Batcher.submit`` (validation on the loop; tokenization on a worker thread; no torch
work) and iterates the returned ``Ticket``; everything that touches the model runs on the engine thread,
which loops:

1. take new requests from a thread-safe inbox (blocking only when there is nothing to do);
2. drop requests that were cancelled or whose deadline passed, releasing their KV-cache slot at once, so a
   cancelled call frees its slot before the next step;
3. prefill the waiting requests ``admission.admissible`` lets in (FIFO, within slots, the token budget
   and ``max_prefill_tokens``) in ONE batched forward, right-padded (``Engine.prefill_batch``): the
   running decodes wait for one prefill of bounded size between two steps, never for a queue of them
   one by one, and a burst of arrivals joins the batch at once instead of one request per step;
4. run one batched decode step over every running sequence; requests join and leave between these steps.

Results go back to the event loop through ``delivery`` (one call per loop pass; held tokens, stream
intervals and completions are its business).

Batch independence: each row of a step computes only its own tokens with its own sampler and RNG (engine
guarantees, see ``engine.sampling`` and ``engine.sparse_ffn``), so the batcher never reorders work in a way
that changes a request's tokens.

Failures (``engine.errors``): a request that fails inside a step (its logits were not finite, its sampler
raised) comes back as its own ``RequestFailed`` and fails alone, INTERNAL; its batch-mates go on. A step
that raises ``StepFailed`` before its forward committed (slots, cache and tallies as they were) is retried
one request at a time, and only the requests that fail alone are failed; one that failed after its forward
committed leaves its rows in an unknown state and all of them fail. Either way the loop keeps serving.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any, Protocol

from sparseinfer.engine.errors import InvalidRequest, RequestFailed, StepFailed
from sparseinfer.engine.sampling import SamplingParams
from sparseinfer.engine.sequence import GenerationEvent, StepOutcome
from sparseinfer.engine.sequence import Sequence as EngineSequence
from sparseinfer.serving.admission import Candidate, admissible
from sparseinfer.serving.config import Limits
from sparseinfer.serving.delivery import Entry, Outbox, Ticket
from sparseinfer.serving.engine_thread import EngineThread
from sparseinfer.serving.requests import BatchRequest, Completion, ErrorKind, ServingError

log = logging.getLogger("sparseinfer.serving.batcher")


class StepEngine(Protocol):
    """The step API of ``sparseinfer.engine.generate.Generator`` that the batcher drives."""

    max_seq: int
    max_bytes_per_token: int  # no token stands for more bytes of text (bounds a prompt before tokenizing)

    def encode(self, text: str) -> list[int]: ...

    def start(
        self, prompt: Any, params: SamplingParams, request_id: Any = None, sparsity_mode: str | None = None
    ) -> EngineSequence: ...

    def prefill_batch(self, seqs: Sequence[EngineSequence]) -> list[StepOutcome]: ...

    def decode_step(self, seqs: Sequence[EngineSequence]) -> list[StepOutcome]: ...

    def release(self, seq: EngineSequence) -> None: ...

    @property
    def free_slots(self) -> int: ...


class Observer:
    """Metric hooks called from the engine thread; the default records nothing (``metrics.ServerMetrics``)."""

    def queue_length(self, n: int) -> None: ...
    def batch_size(self, n: int) -> None: ...
    def step(self, kind: str, tokens: int, seconds: float) -> None: ...
    def first_token(self, seconds: float) -> None: ...
    def inter_token(self, seconds: float) -> None: ...
    def completed(self, completion: Completion) -> None: ...
    def kv_cache(self, used: int, total: int) -> None: ...


def _log_crash(done: Future[None]) -> None:
    if not done.cancelled() and done.exception() is not None:
        log.error("the engine loop crashed", exc_info=done.exception())


_WAKE = object()
_STOP = object()


class Batcher:
    """Continuous batching of ``engine`` under ``limits``; ``start()`` the engine thread before submitting."""

    def __init__(
        self,
        engine: StepEngine,
        limits: Limits,
        observer: Observer | None = None,
        thread: EngineThread | None = None,
    ) -> None:
        """``thread``: where the loop runs; pass the one that loaded the model (see ``engine_thread``)."""
        limits.validate()
        self.engine = engine
        self.limits = limits
        self.observer = observer if observer is not None else Observer()
        self._inbox: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._accepting = True
        self._queued = 0  # accepted, not yet prefilled (guarded by _lock)
        self._owns_thread = thread is None
        self._thread = thread if thread is not None else EngineThread()
        self._loop_done: Future[None] | None = None
        self._stop_at: float | None = None
        self.max_prompt_tokens = limits.prompt_tokens(engine.max_seq)
        # A text longer than this cannot tokenize into max_prompt_tokens: refused before any tokenizing.
        self.max_prompt_bytes = limits.prompt_bytes(engine.max_seq, engine.max_bytes_per_token)
        self.max_request_bytes = limits.request_bytes(engine.max_seq, engine.max_bytes_per_token)
        # Tokenizing (and the prompt's detokenizer context) is request-sized CPU work: never on the loop.
        self._prepare = ThreadPoolExecutor(max_workers=2, thread_name_prefix="sparseinfer-prepare")
        # Engine-thread state.
        self._waiting: deque[Entry] = deque()
        self._running: list[Entry] = []
        self._reserved = 0  # Σ reserved tokens of running requests
        self._outbox = Outbox()
        # The engine is new to the batcher, so every cache slot is free now: this is the cache's size.
        self._cache_slots = engine.free_slots

    # ---- asyncio side --------------------------------------------------------------------------------

    def start(self) -> None:
        self._loop_done = self._thread.submit(self._run)
        self._loop_done.add_done_callback(_log_crash)

    @property
    def queued(self) -> int:
        return self._queued

    @property
    def in_flight(self) -> int:
        """Requests accepted and not yet ended: queued (or being tokenized) and running."""
        return self._queued + len(self._running)

    async def submit(self, request: BatchRequest) -> Ticket:
        """Validate and enqueue ``request`` (call on the event loop); raises ``ServingError`` when it is
        invalid (INVALID), the queue is full (OVERLOADED) or the server is draining (UNAVAILABLE).

        The cheap checks run first, on the loop: a text prompt longer than ``max_prompt_bytes`` is refused by
        its length alone, and a full queue answers before any work is spent on the request. Tokenizing runs
        on a worker thread (``prepare``), so one large prompt never stalls other streams or health checks."""
        if isinstance(request.prompt, str):
            # A character is at least one byte: a text with too many characters is refused uncopied.
            text = request.prompt
            size = (
                len(text) if len(text) > self.max_prompt_bytes else len(text.encode("utf-8", "surrogatepass"))
            )
            if size > self.max_prompt_bytes:
                raise ServingError.invalid(
                    "prompt",
                    f"has {size} bytes of text, the limit is {self.max_prompt_bytes} "
                    f"({self.max_prompt_tokens} tokens of at most "
                    f"{self.max_prompt_bytes // max(self.max_prompt_tokens, 1)} bytes each)",
                )
        self._claim_queue_place()
        try:
            seq = await asyncio.get_running_loop().run_in_executor(self._prepare, self.prepare, request)
        except BaseException:
            self._dequeue()
            raise
        ticket = Ticket(request, seq, self._wake)
        self._inbox.put(Entry(ticket))
        return ticket

    def _claim_queue_place(self) -> None:
        with self._lock:
            if not self._accepting:
                raise ServingError(ErrorKind.UNAVAILABLE, "the server is shutting down")
            if self._queued >= self.limits.max_queue:
                raise ServingError(
                    ErrorKind.OVERLOADED,
                    f"the request queue is full ({self.limits.max_queue} waiting); retry later",
                )
            self._queued += 1

    def prepare(self, request: BatchRequest) -> EngineSequence:
        """Tokenize ``request`` and check it against the limits: the engine's ``Sequence`` for it, or
        ``ServingError`` (INVALID). Thread-safe; touches no model state."""
        lim = self.limits
        params = request.params
        if params.max_new_tokens > lim.max_new_tokens:
            raise ServingError.invalid(
                "max_new_tokens", f"must be <= {lim.max_new_tokens}, got {params.max_new_tokens}"
            )
        ids = self.engine.encode(request.prompt) if isinstance(request.prompt, str) else list(request.prompt)
        n = len(ids)
        if n > self.max_prompt_tokens:
            raise ServingError.invalid("prompt", f"has {n} tokens, the limit is {self.max_prompt_tokens}")
        if request.default_max_new_tokens:  # the caller left it to us: as many as fit, up to the default
            fits = max(1, self.engine.max_seq - n)
            params = dataclasses.replace(params, max_new_tokens=min(params.max_new_tokens, fits))
        need = n + params.max_new_tokens
        if lim.max_total_tokens is not None and need > lim.max_total_tokens:
            raise ServingError.invalid(
                "max_new_tokens",
                f"prompt ({n}) + max_new_tokens ({params.max_new_tokens}) exceeds the server's "
                f"token budget {lim.max_total_tokens}",
            )
        try:
            return self.engine.start(tuple(ids), params, request.request_id, request.sparsity_mode)
        except InvalidRequest as e:
            raise ServingError.invalid(e.field, e.detail) from None

    def stop_accepting(self) -> None:
        with self._lock:
            self._accepting = False

    def close(self, grace: float = 0.0, timeout: float | None = None) -> None:
        """Stop accepting, let running and queued requests finish for up to ``grace`` seconds, fail the
        rest with UNAVAILABLE, and join the engine thread."""
        self.stop_accepting()
        if self._loop_done is not None and not self._loop_done.done():
            self._inbox.put((_STOP, grace))
            with contextlib.suppress(FutureTimeout):
                self._loop_done.exception(timeout)  # waits; a crash was logged already
        self._prepare.shutdown(wait=False, cancel_futures=True)
        if self._owns_thread:
            self._thread.stop(timeout)

    def end_grace_now(self) -> None:
        """Cut a drain short (from any thread): the engine loop ends after the step it is in, as if the
        grace period had passed (running requests end "cancelled", queued ones UNAVAILABLE)."""
        self.stop_accepting()
        self._inbox.put((_STOP, 0.0))

    def _wake(self) -> None:
        self._inbox.put(_WAKE)

    # ---- engine thread -------------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            # Block for new work only when idle and not draining (a drain ends as soon as all work is done).
            self._take_inbox(block=not (self._waiting or self._running) and self._stop_at is None)
            now = time.monotonic()
            if self._stop_at is not None and (now >= self._stop_at or not (self._waiting or self._running)):
                break
            self._reap(now)
            self._admit()
            if self._running:
                self._decode()
            self._outbox.flush()
            self._report_gauges()  # after the step, so that an idle server reads 0, not its last batch
        # Past the grace period: running requests end with what they have (finish reason "cancelled");
        # requests that never started fail UNAVAILABLE so that clients retry elsewhere.
        for entry in self._running:
            self.engine.release(entry.seq)
            self._outbox.put(entry, entry.completion("cancelled"))
        for entry in self._waiting:
            self._outbox.fail(entry, ServingError(ErrorKind.UNAVAILABLE, "the server shut down first"))
        self._waiting.clear()
        self._running.clear()
        self._outbox.flush()
        self._report_gauges()

    def _report_gauges(self) -> None:
        self.observer.queue_length(self._queued)
        self.observer.batch_size(len(self._running))
        self.observer.kv_cache(self._cache_slots - self.engine.free_slots, self._cache_slots)

    def _take_inbox(self, block: bool) -> None:
        while True:
            try:
                item = self._inbox.get(block=block)
            except queue.Empty:
                return
            block = False
            if isinstance(item, Entry):
                self._waiting.append(item)
            elif isinstance(item, tuple) and item[0] is _STOP:  # the earliest stop asked for wins
                at = time.monotonic() + float(item[1])
                self._stop_at = at if self._stop_at is None else min(self._stop_at, at)

    def _reap(self, now: float) -> None:
        """Drop cancelled and expired requests (waiting or running) and free their slots."""
        for entries, waiting in ((self._waiting, True), (self._running, False)):
            dead = [e for e in entries if e.ticket.cancelled or e.expired(now)]
            for entry in dead:
                entries.remove(entry)
                if waiting:
                    self._dequeue()
                else:
                    self._reserved -= entry.reserved
                self.engine.release(entry.seq)
                if entry.ticket.cancelled:
                    err = ServingError(ErrorKind.CANCELLED, "the request was cancelled")
                else:
                    err = ServingError(ErrorKind.DEADLINE, "the deadline passed; generation stopped")
                self._outbox.fail(entry, err)

    def _dequeue(self) -> None:
        with self._lock:
            self._queued -= 1

    def _admit(self) -> None:
        batch = self._take_admissible()
        if not batch:
            return
        t0 = time.perf_counter()
        for entry in batch:
            entry.t_admit = t0
        outcomes = self._step(self.engine.prefill_batch, batch)
        now = time.perf_counter()
        self.observer.step("prefill", sum(len(e.seq.prompt_ids) for e in batch), now - t0)
        for entry, outcome in zip(batch, outcomes, strict=True):
            if isinstance(outcome, Exception):
                self._engine_failed(entry, outcome)
                continue
            entry.t_prefilled = entry.t_first = entry.t_last = now
            self.observer.first_token(now - entry.t_accept)
            if not entry.seq.finished:
                self._running.append(entry)
                self._reserved += entry.reserved
            self._deliver(entry, outcome)

    def _take_admissible(self) -> list[Entry]:
        """Pop the waiting requests that may start now (``admission.admissible``)."""
        candidates = [Candidate(len(e.seq.prompt_ids), e.reserved) for e in self._waiting]
        n = admissible(candidates, len(self._running), self._reserved, self.engine.free_slots, self.limits)
        batch = [self._waiting.popleft() for _ in range(n)]
        for _ in batch:
            self._dequeue()
        return batch

    def _decode(self) -> None:
        batch = self._running
        t0 = time.perf_counter()
        outcomes = self._step(self.engine.decode_step, batch)
        now = time.perf_counter()
        self.observer.step("decode", len(batch), now - t0)
        self._running = []
        for entry, outcome in zip(batch, outcomes, strict=True):
            if isinstance(outcome, Exception):
                self._reserved -= entry.reserved
                self._engine_failed(entry, outcome)
                continue
            self.observer.inter_token(now - entry.t_last)
            entry.t_last = now
            if entry.seq.finished:
                self._reserved -= entry.reserved
            else:
                self._running.append(entry)
            self._deliver(entry, outcome)

    def _step(
        self, step: Callable[[list[EngineSequence]], list[StepOutcome]], batch: list[Entry]
    ) -> list[GenerationEvent | Exception]:
        """Run ``step`` (the engine's prefill_batch or decode_step) over ``batch``: each entry's event, or
        the exception that failed it. A request that fails alone (``RequestFailed``) fails alone. A step that
        failed before its forward committed is retried one entry at a time, so that only the entries that
        fail alone fail; one that failed after (or with an error the engine did not type) leaves its rows in
        an unknown state, and all of them fail."""
        seqs = [e.seq for e in batch]
        try:
            return list(step(seqs))
        except StepFailed as e:
            if e.committed or len(batch) == 1:
                return [e] * len(batch)
            log.warning("a step of %d requests failed: %r; retrying each alone", len(batch), e)
        except Exception as e:
            return [e] * len(batch)
        out: list[GenerationEvent | Exception] = []
        for entry in batch:
            try:
                (outcome,) = step([entry.seq])
                out.append(outcome)
            except Exception as e:
                out.append(e)
        return out

    def _engine_failed(self, entry: Entry, error: Exception) -> None:
        """Fail ``entry`` with INTERNAL after the engine raised on it (or failed it alone), and give its slot
        back."""
        msg = (
            str(error) if isinstance(error, RequestFailed) else f"the engine failed on this request: {error}"
        )
        log.error(msg, exc_info=error, extra={"request_id": entry.request.request_id})
        self.engine.release(entry.seq)
        self._outbox.fail(entry, ServingError(ErrorKind.INTERNAL, msg))

    def _deliver(self, entry: Entry, event: GenerationEvent) -> None:
        item = entry.add(event)
        if isinstance(item, Completion):
            self.observer.completed(item)
        if item is not None:
            self._outbox.put(entry, item)
