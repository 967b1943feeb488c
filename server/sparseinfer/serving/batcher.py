"""Continuous batching over the engine's step API, on one dedicated engine thread.

The asyncio side calls ``Batcher.submit`` (validation and tokenization only, no torch work) and iterates the
returned ``Ticket``; everything that touches the model runs on the engine thread, which loops:

1. take new requests from a thread-safe inbox (blocking only when there is nothing to do);
2. drop requests that were cancelled or whose deadline passed, releasing their KV-cache slot at once, so a
   cancelled call frees its slot before the next step;
3. prefill waiting requests (FIFO, as many as slots, the token budget and ``max_prefill_tokens`` allow) in
   ONE batched forward, right-padded (``Generator.prefill_batch``): the running decodes wait for one
   prefill of bounded size between two steps, never for a queue of them one by one, and a burst of
   arrivals joins the batch at once instead of one request per step;
4. run one batched decode step over every running sequence; requests join and leave between these steps.

Results go back through ``loop.call_soon_threadsafe``, one call per step for all requests of that step
that have something to send: a streaming request gets its first token at once and then every
``BatchRequest.stream_interval`` tokens merged into one chunk, a unary one (``BatchRequest.stream`` False)
only its completion, with every token merged into it.

Batch independence: each row of a step computes only its own tokens with its own sampler and RNG (engine
guarantees, see ``engine.sampling`` and ``engine.sparse_ffn``), so the batcher never reorders work in a way
that changes a request's tokens.

Failures: a prefill that raises is retried one request at a time (the engine leaves slots and tallies as
they were), and only the requests that fail alone are failed. A decode step that raises before the model
forward completed (no row's sparsity tally advanced, so no cache position was committed) is retried row by
row and only the rows that fail alone are failed; if it raised later, the step's rows are in an unknown
state and all of them fail. Either way the loop keeps serving.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any, Protocol

from sparseinfer.engine.sampling import SamplingParams
from sparseinfer.engine.sequence import GenerationEvent
from sparseinfer.engine.sequence import Sequence as EngineSequence
from sparseinfer.serving.config import Limits
from sparseinfer.serving.engine_thread import EngineThread
from sparseinfer.serving.requests import (
    BatchRequest,
    Completion,
    ErrorKind,
    ServingError,
    StreamItem,
    Timings,
    TokenChunk,
    merge_chunks,
)

log = logging.getLogger("sparseinfer.serving.batcher")

_FIELDS = ("max_new_tokens", "temperature", "top_k", "top_p", "repetition_penalty", "seed", "stop")


class Engine(Protocol):
    """The step API of ``sparseinfer.engine.generate.Generator`` that the batcher drives."""

    max_seq: int

    def start(
        self, prompt: Any, params: SamplingParams, request_id: Any = None, sparsity_mode: str | None = None
    ) -> EngineSequence: ...

    def prefill_batch(self, seqs: Sequence[EngineSequence]) -> list[GenerationEvent]: ...

    def decode_step(self, seqs: Sequence[EngineSequence]) -> list[GenerationEvent]: ...

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


class Ticket:
    """The asyncio side of one request: iterate it for ``TokenChunk``s then one ``Completion``; a failure
    raises ``ServingError``. ``cancel()`` (idempotent) makes the engine drop the request before its next
    step."""

    def __init__(self, batcher: Batcher, request: BatchRequest, seq: EngineSequence) -> None:
        self._batcher = batcher
        self.request = request
        self.seq = seq
        self.prompt_tokens = len(seq.prompt_ids)
        self.loop = asyncio.get_running_loop()
        self._items: asyncio.Queue[StreamItem] = asyncio.Queue()
        self.cancelled = False  # set on the loop thread, read by the engine thread (a bool store is atomic)
        self.done = False

    def cancel(self) -> None:
        if not self.done and not self.cancelled:
            self.cancelled = True
            self._batcher._wake()

    def __aiter__(self) -> Ticket:
        return self

    async def __anext__(self) -> TokenChunk | Completion:
        if self.done:
            raise StopAsyncIteration
        item = await self._items.get()
        if isinstance(item, ServingError):
            self.done = True
            raise item
        if isinstance(item, Completion):
            self.done = True
        return item


class _Entry:
    """Engine-thread bookkeeping of one request."""

    def __init__(self, ticket: Ticket) -> None:
        self.ticket = ticket
        self.seq = ticket.seq
        self.request = ticket.request
        self.reserved = len(ticket.seq.prompt_ids) + ticket.request.params.max_new_tokens
        self.t_accept = time.perf_counter()
        self.t_admit = self.t_prefilled = self.t_first = self.t_last = 0.0
        # Tokens not sent yet: a unary request's until its completion, a streaming one's until its interval.
        self.held: list[TokenChunk] = []


def _log_crash(done: Future[None]) -> None:
    if not done.cancelled() and done.exception() is not None:
        log.error("the engine loop crashed", exc_info=done.exception())


_WAKE = object()
_STOP = object()


class Batcher:
    """Continuous batching of ``engine`` under ``limits``; ``start()`` the engine thread before submitting."""

    def __init__(
        self,
        engine: Engine,
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
        # Engine-thread state.
        self._waiting: deque[_Entry] = deque()
        self._running: list[_Entry] = []
        self._reserved = 0  # Σ reserved tokens of running requests
        self._outbox: list[tuple[Ticket, StreamItem]] = []

    # ---- asyncio side --------------------------------------------------------------------------------

    def start(self) -> None:
        self._loop_done = self._thread.submit(self._run)
        self._loop_done.add_done_callback(_log_crash)

    @property
    def queued(self) -> int:
        return self._queued

    def submit(self, request: BatchRequest) -> Ticket:
        """Validate and enqueue ``request`` (call on the event loop); raises ``ServingError`` at once when it
        is invalid (INVALID), the queue is full (OVERLOADED) or the server is draining (UNAVAILABLE)."""
        lim = self.limits
        if request.params.max_new_tokens > lim.max_new_tokens:
            raise ServingError.invalid(
                "max_new_tokens", f"must be <= {lim.max_new_tokens}, got {request.params.max_new_tokens}"
            )
        try:
            seq = self.engine.start(request.prompt, request.params, request.request_id, request.sparsity_mode)
        except ValueError as e:  # the engine names the field in its message; find which one it is
            raise ServingError.invalid(_field_of(str(e)), str(e)) from None
        n = len(seq.prompt_ids)
        max_prompt = lim.max_prompt_tokens if lim.max_prompt_tokens is not None else self.engine.max_seq - 1
        if n > max_prompt:
            raise ServingError.invalid("prompt", f"has {n} tokens, the limit is {max_prompt}")
        need = n + request.params.max_new_tokens
        if lim.max_total_tokens is not None and need > lim.max_total_tokens:
            raise ServingError.invalid(
                "max_new_tokens",
                f"prompt ({n}) + max_new_tokens ({request.params.max_new_tokens}) exceeds the server's "
                f"token budget {lim.max_total_tokens}",
            )
        ticket = Ticket(self, request, seq)
        with self._lock:
            if not self._accepting:
                raise ServingError(ErrorKind.UNAVAILABLE, "the server is shutting down")
            if self._queued >= lim.max_queue:
                raise ServingError(
                    ErrorKind.OVERLOADED, f"the request queue is full ({lim.max_queue} waiting); retry later"
                )
            self._queued += 1
        self._inbox.put(_Entry(ticket))
        return ticket

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
        if self._owns_thread:
            self._thread.stop(timeout)

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
            self._flush()
        # Past the grace period: running requests end with what they have (finish reason "cancelled");
        # requests that never started fail UNAVAILABLE so that clients retry elsewhere.
        for entry in self._running:
            self.engine.release(entry.seq)
            self._emit(entry, self._completion(entry, "cancelled"))
        for entry in self._waiting:
            self._fail(entry, ServingError(ErrorKind.UNAVAILABLE, "the server shut down first"))
        self._waiting.clear()
        self._running.clear()
        self._flush()

    def _take_inbox(self, block: bool) -> None:
        while True:
            try:
                item = self._inbox.get(block=block)
            except queue.Empty:
                return
            block = False
            if isinstance(item, _Entry):
                self._waiting.append(item)
            elif isinstance(item, tuple) and item[0] is _STOP:
                self._stop_at = time.monotonic() + float(item[1])

    def _reap(self, now: float) -> None:
        """Drop cancelled and expired requests (waiting or running) and free their slots."""
        for entries, waiting in ((self._waiting, True), (self._running, False)):
            dead = [e for e in entries if e.ticket.cancelled or _expired(e, now)]
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
                self._fail(entry, err)
        self.observer.queue_length(len(self._waiting))
        self.observer.batch_size(len(self._running))

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
        try:
            events: list[GenerationEvent | Exception] = list(
                self.engine.prefill_batch([b.seq for b in batch])
            )
        except Exception as e:
            if len(batch) == 1:
                events = [e]
            else:
                log.warning("batched prefill of %d requests failed: %r; retrying each alone", len(batch), e)
                events = self._each_alone(self.engine.prefill_batch, batch)
        now = time.perf_counter()
        self.observer.step("prefill", sum(len(e.seq.prompt_ids) for e in batch), now - t0)
        for entry, event in zip(batch, events, strict=True):
            if isinstance(event, Exception):
                self._engine_failed(entry, event)
                continue
            entry.t_prefilled = entry.t_first = entry.t_last = now
            self.observer.first_token(now - entry.t_accept)
            if not entry.seq.finished:
                self._running.append(entry)
                self._reserved += entry.reserved
            self._deliver(entry, event)

    def _take_admissible(self) -> list[_Entry]:
        """Pop the waiting requests that may start now, in order: while a batch row and a cache slot are
        free, the token budget holds, and the padded prefill stays within ``max_prefill_tokens`` (the first
        one is taken whatever its length)."""
        lim = self.limits
        slots = min(lim.max_batch_size - len(self._running), self.engine.free_slots)
        batch: list[_Entry] = []
        reserved, longest = self._reserved, 0
        while self._waiting and len(batch) < slots:
            entry = self._waiting[0]
            budget = lim.max_total_tokens
            if budget is not None and (self._running or batch) and reserved + entry.reserved > budget:
                break  # FIFO: wait for running requests to finish rather than let smaller ones jump ahead
            n = max(longest, len(entry.seq.prompt_ids))
            if batch and n * (len(batch) + 1) > lim.max_prefill_tokens:
                break
            self._waiting.popleft()
            self._dequeue()
            batch.append(entry)
            reserved += entry.reserved
            longest = n
        return batch

    def _decode(self) -> None:
        batch = self._running
        seqs = [e.seq for e in batch]
        counted = [s.sparsity.tokens for s in seqs]
        t0 = time.perf_counter()
        try:
            events: list[GenerationEvent | Exception] = list(self.engine.decode_step(seqs))
        except Exception as e:
            log.warning("decode step of %d sequences failed: %r", len(batch), e)
            forward_done = any(s.sparsity.tokens != c for s, c in zip(seqs, counted, strict=True))
            alone = forward_done or len(batch) == 1
            events = [e] * len(batch) if alone else self._each_alone(self.engine.decode_step, batch)
        now = time.perf_counter()
        self.observer.step("decode", len(batch), now - t0)
        self._running = []
        for entry, event in zip(batch, events, strict=True):
            if isinstance(event, Exception):
                self._reserved -= entry.reserved
                self._engine_failed(entry, event)
                continue
            self.observer.inter_token(now - entry.t_last)
            entry.t_last = now
            if entry.seq.finished:
                self._reserved -= entry.reserved
            else:
                self._running.append(entry)
            self._deliver(entry, event)

    def _each_alone(
        self, step: Callable[[list[EngineSequence]], list[GenerationEvent]], batch: list[_Entry]
    ) -> list[GenerationEvent | Exception]:
        """Run ``step`` (the engine's prefill_batch or decode_step) on each entry alone: its event, or the
        exception it raised alone."""
        out: list[GenerationEvent | Exception] = []
        for entry in batch:
            try:
                (event,) = step([entry.seq])
                out.append(event)
            except Exception as e:
                out.append(e)
        return out

    def _engine_failed(self, entry: _Entry, error: Exception) -> None:
        """Fail ``entry`` with INTERNAL after the engine raised on it, and give its slot back."""
        msg = f"the engine failed on this request: {error}"
        log.error(msg, exc_info=error, extra={"request_id": entry.request.request_id})
        self.engine.release(entry.seq)
        self._fail(entry, ServingError(ErrorKind.INTERNAL, msg))

    # ---- results -------------------------------------------------------------------------------------

    def _deliver(self, entry: _Entry, event: GenerationEvent) -> None:
        chunk = TokenChunk(event.text, tuple(event.token_ids), tuple(event.logprobs))
        entry.held.append(chunk)
        if event.finish_reason is None:
            request = entry.request
            if request.stream and (len(entry.seq.output_ids) - 1) % request.stream_interval == 0:
                self._emit(entry, self._take_held(entry))
        else:
            completion = self._completion(entry, event.finish_reason)
            self.observer.completed(completion)
            self._emit(entry, completion)

    def _completion(self, entry: _Entry, finish_reason: Any) -> Completion:
        last = self._take_held(entry)  # tokens not sent yet travel with the completion
        seq = entry.seq
        n = len(seq.output_ids)
        timings = Timings(
            queue_s=entry.t_admit - entry.t_accept,
            prefill_s=entry.t_prefilled - entry.t_admit,
            ttft_s=entry.t_first - entry.t_accept,
            total_s=entry.t_last - entry.t_accept,
            mean_inter_token_s=(entry.t_last - entry.t_first) / (n - 1) if n > 1 else 0.0,
        )
        return Completion(
            finish_reason, len(seq.prompt_ids), n, seq.seed, timings, seq.sparsity.report(), last
        )

    def _take_held(self, entry: _Entry) -> TokenChunk | None:
        """The tokens not sent yet as one chunk (None if there are none); they count as sent from now."""
        held, entry.held = entry.held, []
        if not held:
            return None
        return held[0] if len(held) == 1 else merge_chunks(held)

    def _fail(self, entry: _Entry, error: ServingError) -> None:
        if entry.request.stream and entry.held:  # a stream gets every token sampled before the error
            self._emit(entry, self._take_held(entry))
        self._emit(entry, error)

    def _emit(self, entry: _Entry, item: StreamItem) -> None:
        self._outbox.append((entry.ticket, item))

    def _flush(self) -> None:
        if not self._outbox:
            return
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[Ticket, StreamItem]]] = {}
        for ticket, item in self._outbox:
            by_loop.setdefault(ticket.loop, []).append((ticket, item))
        self._outbox = []
        for loop, items in by_loop.items():
            with contextlib.suppress(RuntimeError):  # a closed loop: nobody is listening any more
                loop.call_soon_threadsafe(_put_all, items)


def _put_all(items: list[tuple[Ticket, StreamItem]]) -> None:
    for ticket, item in items:
        ticket._items.put_nowait(item)


def _expired(entry: _Entry, now: float) -> bool:
    return entry.request.deadline is not None and now >= entry.request.deadline


def _field_of(message: str) -> str:
    """The request field an engine ``ValueError`` is about (its messages start with or name the field)."""
    if "sparsity mode" in message or "sidecar" in message:
        return "sparsity_mode"
    for name in _FIELDS:
        if message.startswith(name) or f"{name}=" in message:
            return name
    return "prompt"
