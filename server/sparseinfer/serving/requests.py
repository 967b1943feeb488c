"""The server's domain types: what the servicer hands the batcher and what comes back, free of protobuf.

The servicer converts wire messages to a ``BatchRequest`` (``from_pb``) and the batcher's ``TokenChunk`` /
``Completion`` / ``ServingError`` stream back to wire messages (``to_pb``); nothing in between sees protobuf.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Literal

from sparseinfer.engine.accounting import SparsityReport
from sparseinfer.engine.sampling import SamplingParams

FinishReason = Literal["length", "eos", "stop", "cancelled"]  # cancelled: shut down past the grace period


class ErrorKind(enum.Enum):
    """Why a request failed; the servicer maps each to one gRPC status code."""

    INVALID = "invalid"  # INVALID_ARGUMENT: the request can never succeed as sent
    OVERLOADED = "overloaded"  # RESOURCE_EXHAUSTED: the queue is full; retry later
    DEADLINE = "deadline"  # DEADLINE_EXCEEDED: the caller's deadline passed; work stopped
    CANCELLED = "cancelled"  # CANCELLED: the caller went away
    INTERNAL = "internal"  # INTERNAL: the engine failed on this request; other requests are unaffected
    UNAVAILABLE = "unavailable"  # UNAVAILABLE: the server is shutting down


class ServingError(Exception):
    """A request's failure, with its kind and (for INVALID) the request field at fault."""

    def __init__(
        self, kind: ErrorKind, message: str, field: str | None = None, detail: str | None = None
    ) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.field = field
        self.detail = detail  # the message without the field name (the servicer re-spells the field)

    @classmethod
    def invalid(cls, field: str, detail: str) -> ServingError:
        return cls(ErrorKind.INVALID, f"{field}: {detail}", field, detail)


@dataclass(frozen=True)
class BatchRequest:
    """One generation request as the batcher sees it."""

    prompt: str | tuple[int, ...]  # text (encoded with the checkpoint's BOS convention) or token ids as given
    params: SamplingParams
    request_id: str
    sparsity_mode: str | None = None  # None: the server's default mode
    deadline: float | None = None  # time.monotonic() after which the request is abandoned; None: none
    # False (unary calls): the caller wants only the end, so the batcher holds the tokens back and returns
    # them merged into ``Completion.last``, waking the event loop once per request instead of per token.
    stream: bool = True
    # A streaming request's first token is sent at once, then every ``stream_interval`` tokens as one
    # chunk (the rest with the completion): fewer messages, less CPU per token on both ends of the stream.
    stream_interval: int = 1
    # True when the caller left max_new_tokens unset: ``params.max_new_tokens`` is then the server's default,
    # lowered to what fits in the context beside the prompt (so that an unset value always succeeds).
    default_max_new_tokens: bool = False


@dataclass(frozen=True)
class TokenChunk:
    """Text that became final at one step and the token id(s) sampled at it."""

    text: str
    token_ids: tuple[int, ...]
    logprobs: tuple[float, ...] = ()  # one per token id when the request asked for them, else empty


@dataclass(frozen=True)
class Timings:
    """Server-side timings of one request, in seconds from when the batcher accepted it."""

    queue_s: float  # accepted → its prefill started (waiting for a slot)
    prefill_s: float  # the prefill step (prompt forward + first token)
    ttft_s: float  # accepted → first token sampled
    total_s: float  # accepted → last token sampled
    mean_inter_token_s: float  # (total - ttft) / (tokens - 1); 0 with one token


@dataclass(frozen=True)
class Completion:
    """The end of a successful request, with the final step's ``TokenChunk`` (``last``)."""

    finish_reason: FinishReason
    prompt_tokens: int
    completion_tokens: int
    seed: int  # the seed actually used, so the request can be replayed
    timings: Timings
    sparsity: SparsityReport
    # The final step's text and token (one message carries both), after any tokens not sent yet: with a
    # ``stream_interval`` over 1, those since the last chunk; for a request with ``stream=False``, all.
    last: TokenChunk | None = None


StreamItem = TokenChunk | Completion | ServingError


def merge_chunks(chunks: list[TokenChunk]) -> TokenChunk:
    """One chunk with the text, token ids and log-probabilities of ``chunks`` in order."""
    return TokenChunk(
        "".join(c.text for c in chunks),
        tuple(t for c in chunks for t in c.token_ids),
        tuple(lp for c in chunks for lp in c.logprobs),
    )
