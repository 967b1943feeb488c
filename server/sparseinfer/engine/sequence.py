"""One request's generation state, and the events and results it produces.

A ``Sequence`` is what the step-level core (``Engine.prefill`` / ``Engine.decode_step``) advances and
what a batcher holds on to: prompt ids, output ids, its sampler, its KV-cache slot, the streaming
detokenizer, stop-string matching and timings. ``Sequence.append`` turns each new token into a
``GenerationEvent`` (text delta + token id, and on the last one the finish reason and stats).
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from collections.abc import Sequence as SequenceABC
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from sparseinfer.engine.accounting import SparsityTally
from sparseinfer.engine.errors import RequestFailed
from sparseinfer.engine.sampling import RequestSampler, SamplingParams

FinishReason = Literal["length", "eos", "stop"]


class TextDecoder(Protocol):
    """Streaming detokenizer (``sparseinfer.model.IncrementalDecoder``): new text per step, holding back
    incomplete UTF-8 until flushed."""

    def step(self, generated_ids: SequenceABC[int]) -> str: ...

    def flush(self) -> str: ...


@dataclass(frozen=True)
class GenerationStats:
    """Token counts and wall-clock timings of one request, measured from when it was submitted."""

    prompt_tokens: int
    completion_tokens: int
    ttft_s: float  # submission → first token sampled (includes prefill and any queueing)
    total_s: float  # submission → last token sampled

    @property
    def decode_s(self) -> float:
        return self.total_s - self.ttft_s

    @property
    def decode_tokens_per_s(self) -> float:
        """Tokens after the first divided by the time after the first token (0 when undefined)."""
        steps = self.completion_tokens - 1
        return steps / self.decode_s if steps > 0 and self.decode_s > 0 else 0.0


@dataclass(frozen=True)
class GenerationEvent:
    """One step of a stream: the text that became final and the token id(s) that produced it.

    ``text`` may be empty (incomplete UTF-8 or a possible stop-string prefix is being held back) and may
    include text from earlier tokens once it is released. Only the last event has ``finish_reason`` and
    ``stats`` set. ``logprobs`` has one entry per token id when the request asked for them, else is empty.
    """

    text: str
    token_ids: tuple[int, ...]
    finish_reason: FinishReason | None = None
    stats: GenerationStats | None = None
    logprobs: tuple[float, ...] = ()

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


# What one step gives each of its sequences: the sequence's event, or its own failure (see engine.errors).
StepOutcome = GenerationEvent | RequestFailed


@dataclass(frozen=True)
class GenerationResult:
    """A whole completion: the concatenated stream."""

    text: str
    token_ids: tuple[int, ...]
    finish_reason: FinishReason
    stats: GenerationStats
    seed: int  # the seed actually used (drawn when the request gave none), so a result can be replayed
    logprobs: tuple[float, ...] = ()  # one per token id when requested (SamplingParams.logprobs), else empty

    @property
    def prompt_tokens(self) -> int:
        return self.stats.prompt_tokens

    @property
    def completion_tokens(self) -> int:
        return self.stats.completion_tokens

    @classmethod
    def collect(cls, events: Iterable[GenerationEvent], seed: int) -> GenerationResult:
        text: list[str] = []
        ids: list[int] = []
        logprobs: list[float] = []
        last: GenerationEvent | None = None
        for event in events:
            text.append(event.text)
            ids.extend(event.token_ids)
            logprobs.extend(event.logprobs)
            last = event
        if last is None or last.finish_reason is None or last.stats is None:
            raise RuntimeError("generation stream ended without a final event")
        return cls("".join(text), tuple(ids), last.finish_reason, last.stats, seed, tuple(logprobs))


class StopMatcher:
    """Finds stop strings in streamed text, holding back any tail that could begin one.

    Only the held-back tail can contain the start of a stop string: text released earlier was, when
    released, not a prefix of any stop string, and appending more text cannot make it one.
    """

    def __init__(self, stops: SequenceABC[str]) -> None:
        self.stops = tuple(stops)
        self._held = ""

    def push(self, delta: str) -> tuple[str, bool]:
        """Add text; return (text safe to emit, whether a stop string was found).

        On a stop, the returned text is everything before the earliest stop string; the rest is dropped.
        """
        if not self.stops:
            return delta, False
        text = self._held + delta
        cut = min((i for i in (text.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self._held = ""
            return text[:cut], True
        hold = self._longest_prefix_tail(text)
        self._held = text[len(text) - hold :]
        return text[: len(text) - hold], False

    def flush(self) -> str:
        """Release what is held back (generation ended without completing a stop string)."""
        held, self._held = self._held, ""
        return held

    def _longest_prefix_tail(self, text: str) -> int:
        # Longest k such that text[-k:] is a proper prefix of some stop string (a full match was ruled out).
        best = 0
        for stop in self.stops:
            for k in range(min(len(stop) - 1, len(text)), best, -1):
                if text.endswith(stop[:k]):
                    best = k
                    break
        return best


class Sequence:
    """Generation state of one request; advanced by ``Engine.prefill`` and ``Engine.decode_step``."""

    def __init__(
        self,
        prompt_ids: SequenceABC[int],
        params: SamplingParams,
        decoder: TextDecoder,
        eos_token_ids: frozenset[int],
        request_id: Any = None,
        sparsity: SparsityTally | None = None,
    ) -> None:
        self.request_id = request_id
        # Per-request sparsity accounting, filled by the Engine at every step (the server reads .report()).
        self.sparsity = sparsity if sparsity is not None else SparsityTally()
        self.prompt_ids = list(prompt_ids)
        self.params = params
        self.sampler = RequestSampler(params, self.prompt_ids)
        self.output_ids: list[int] = []
        self.slot: int | None = None  # KV-cache slot while the sequence holds one
        self.finish_reason: FinishReason | None = None
        self.error: RequestFailed | None = None  # set when the request failed inside a step (``fail``)
        self._decoder = decoder
        self._eos = frozenset() if params.ignore_eos else eos_token_ids
        self._stop = StopMatcher(params.stop)
        self.t_submit = time.perf_counter()
        self.t_first: float | None = None
        self.t_last: float | None = None

    @property
    def seed(self) -> int:
        return self.sampler.seed

    @property
    def finished(self) -> bool:
        """Ended, one way or the other: a finish reason, or a failure (``error``)."""
        return self.finish_reason is not None or self.error is not None

    def fail(self, error: RequestFailed) -> None:
        """End this sequence with ``error`` (a step failed for it alone); it takes no more tokens."""
        self.error = error

    @property
    def prefilled(self) -> bool:
        return bool(self.output_ids)

    @property
    def last_token(self) -> int:
        """The token to feed to the next decode step."""
        return self.output_ids[-1]

    def append(self, token_id: int, logprob: float | None = None) -> GenerationEvent:
        """Record a sampled token and turn it into an event (the final one if this token ends the request).

        ``logprob`` (given when the request asked for log-probabilities) is carried on the event."""
        if self.finished:
            raise RuntimeError(f"sequence {self.request_id!r} already finished ({self.finish_reason})")
        now = time.perf_counter()
        self.t_first = now if self.t_first is None else self.t_first
        self.t_last = now
        self.output_ids.append(token_id)
        self.sampler.observe(token_id)

        logprobs = (logprob,) if logprob is not None else ()
        text = ""
        if token_id in self._eos:
            # The EOS token counts as a completion token (as in HF and vLLM) but has no text.
            self.finish_reason = "eos"
        else:
            text, stopped = self._stop.push(self._decoder.step(self.output_ids))
            if stopped:
                self.finish_reason = "stop"
        if self.finish_reason is None and len(self.output_ids) >= self.params.max_new_tokens:
            self.finish_reason = "length"
        if self.finish_reason is None:
            return GenerationEvent(text, (token_id,), logprobs=logprobs)

        if self.finish_reason != "stop":
            # Release what was held back: incomplete UTF-8 (as replacement characters) and any tail that
            # looked like the start of a stop string. The decoder's tail can still complete a stop string.
            tail, stopped = self._stop.push(self._decoder.flush())
            if stopped:
                self.finish_reason = "stop"
            text += tail + self._stop.flush()
        return GenerationEvent(text, (token_id,), self.finish_reason, self.stats(), logprobs)

    def stats(self) -> GenerationStats:
        first = self.t_first if self.t_first is not None else self.t_submit
        last = self.t_last if self.t_last is not None else first
        return GenerationStats(
            prompt_tokens=len(self.prompt_ids),
            completion_tokens=len(self.output_ids),
            ttft_s=first - self.t_submit,
            total_s=last - self.t_submit,
        )
