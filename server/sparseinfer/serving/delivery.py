"""How results travel from the engine thread to the event loop: the request's ``Ticket`` (the asyncio side),
its ``Entry`` (the engine side: timings and the tokens not sent yet) and the ``Outbox`` of one loop pass.

A streaming request gets its first token at once and then every ``BatchRequest.stream_interval`` tokens
merged into one chunk; a unary one (``BatchRequest.stream`` False) only its completion, with every token
merged into it. Tokens held back travel with the completion, or go out before an error, so a stream never
loses a token it would have seen with interval 1. Everything one loop pass produced reaches each event loop
in one ``call_soon_threadsafe`` call.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from typing import Any

from sparseinfer.engine.sequence import GenerationEvent
from sparseinfer.engine.sequence import Sequence as EngineSequence
from sparseinfer.serving.requests import (
    BatchRequest,
    Completion,
    ServingError,
    StreamItem,
    Timings,
    TokenChunk,
    merge_chunks,
)


class Ticket:
    """The asyncio side of one request: iterate it for ``TokenChunk``s then one ``Completion``; a failure
    raises ``ServingError``. ``cancel()`` (idempotent) makes the engine drop the request before its next
    step (``wake`` tells the engine thread to look)."""

    def __init__(self, request: BatchRequest, seq: EngineSequence, wake: Callable[[], None]) -> None:
        self.request = request
        self.seq = seq
        self.prompt_tokens = len(seq.prompt_ids)
        self.loop = asyncio.get_running_loop()
        self._wake = wake
        self._items: asyncio.Queue[StreamItem] = asyncio.Queue()
        self.cancelled = False  # set on the loop thread, read by the engine thread (a bool store is atomic)
        self.done = False

    def cancel(self) -> None:
        if not self.done and not self.cancelled:
            self.cancelled = True
            self._wake()

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


class Entry:
    """Engine-thread bookkeeping of one request: what it reserves, its timings, its unsent tokens."""

    def __init__(self, ticket: Ticket) -> None:
        self.ticket = ticket
        self.seq = ticket.seq
        self.request = ticket.request
        self.reserved = len(ticket.seq.prompt_ids) + ticket.request.params.max_new_tokens
        self.t_accept = time.perf_counter()
        self.t_admit = self.t_prefilled = self.t_first = self.t_last = 0.0
        # Tokens not sent yet: a unary request's until its completion, a streaming one's until its interval.
        self.held: list[TokenChunk] = []

    def expired(self, now: float) -> bool:
        return self.request.deadline is not None and now >= self.request.deadline

    def add(self, event: GenerationEvent) -> TokenChunk | Completion | None:
        """Record a step's event; what to send now: a chunk whose interval is due, the completion with
        every held token, or nothing."""
        self.held.append(TokenChunk(event.text, tuple(event.token_ids), tuple(event.logprobs)))
        if event.finish_reason is not None:
            return self.completion(event.finish_reason)
        request = self.request
        if request.stream and (len(self.seq.output_ids) - 1) % request.stream_interval == 0:
            return self.take_held()
        return None

    def completion(self, finish_reason: Any) -> Completion:
        last = self.take_held()  # tokens not sent yet travel with the completion
        seq = self.seq
        n = len(seq.output_ids)
        timings = Timings(
            queue_s=self.t_admit - self.t_accept,
            prefill_s=self.t_prefilled - self.t_admit,
            ttft_s=self.t_first - self.t_accept,
            total_s=self.t_last - self.t_accept,
            mean_inter_token_s=(self.t_last - self.t_first) / (n - 1) if n > 1 else 0.0,
        )
        return Completion(
            finish_reason, len(seq.prompt_ids), n, seq.seed, timings, seq.sparsity.report(), last
        )

    def take_held(self) -> TokenChunk | None:
        """The tokens not sent yet as one chunk (None if there are none); they count as sent from now."""
        held, self.held = self.held, []
        if not held:
            return None
        return held[0] if len(held) == 1 else merge_chunks(held)


class Outbox:
    """What one pass of the engine loop sends, delivered per event loop in one call."""

    def __init__(self) -> None:
        self._items: list[tuple[Ticket, StreamItem]] = []

    def put(self, entry: Entry, item: StreamItem) -> None:
        self._items.append((entry.ticket, item))

    def fail(self, entry: Entry, error: ServingError) -> None:
        """``error`` for ``entry``, after any tokens a stream has not been sent yet."""
        if entry.request.stream and entry.held:
            chunk = entry.take_held()
            assert chunk is not None
            self.put(entry, chunk)
        self.put(entry, error)

    def flush(self) -> None:
        if not self._items:
            return
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[Ticket, StreamItem]]] = {}
        for ticket, item in self._items:
            by_loop.setdefault(ticket.loop, []).append((ticket, item))
        self._items = []
        for loop, items in by_loop.items():
            with contextlib.suppress(RuntimeError):  # a closed loop: nobody is listening any more
                loop.call_soon_threadsafe(_put_all, items)


def _put_all(items: list[tuple[Ticket, StreamItem]]) -> None:
    for ticket, item in items:
        ticket._items.put_nowait(item)
