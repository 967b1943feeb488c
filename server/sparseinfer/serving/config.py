"""``ServeConfig``: every setting of a running server, frozen, built once from the ``serve`` flags.

Limits are deliberate defaults for one CPU or one GPU host; each one names the flag that changes it.
Message sizes: a request carries at most a prompt (text or ids) and a few stop strings, so 4 MiB is ample and
bounds what one client can make the server buffer; a unary response carries every token (text, id and, on
request, logprobs) and the sparsity report, so sends get 16 MiB.
"""

from __future__ import annotations

import asyncio
import importlib.util
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from sparseinfer.model.step import MODES, SparsityMode

if TYPE_CHECKING:
    from sparseinfer.engine.factory import EngineConfig

MAX_RECEIVE_MESSAGE_BYTES = 4 * 1024 * 1024  # the ceiling; a model's own limit is usually far lower
MAX_SEND_MESSAGE_BYTES = 16 * 1024 * 1024
MAX_REQUEST_ID = 128  # characters

# uvloop wakes for a streamed token with less CPU than asyncio's own loop (benchmarks/results/README.md);
# it is a dependency wherever it builds.
EVENT_LOOPS = ("uvloop", "asyncio")
DEFAULT_EVENT_LOOP = "asyncio" if sys.platform == "win32" else "uvloop"


def event_loop_installed(kind: str) -> bool:
    """Whether ``new_event_loop(kind)`` can work here (asyncio always; uvloop when it is installed)."""
    return kind == "asyncio" or importlib.util.find_spec(kind) is not None


def new_event_loop(kind: str) -> asyncio.AbstractEventLoop:
    """A new event loop of ``kind``, one of ``EVENT_LOOPS`` (uvloop must be installed for "uvloop")."""
    if kind == "uvloop":
        import uvloop

        return uvloop.new_event_loop()
    return asyncio.new_event_loop()


@dataclass(frozen=True)
class Limits:
    """What one request and the whole batch may use; the batcher and the servicer enforce these."""

    max_batch_size: int = 16  # sequences decoded together in one step (KV-cache slots)
    max_queue: int = 64  # requests waiting for a slot; one more answers RESOURCE_EXHAUSTED at once
    max_total_tokens: int | None = None  # Σ (prompt + max_new_tokens) of admitted requests; None: no cap
    max_prompt_tokens: int | None = None  # None: the context length minus one
    # Tokens of one batched prefill, padding included (prompts × the longest); the first waiting prompt is
    # admitted whatever its length. Bounds how long one prefill holds up the running decodes.
    max_prefill_tokens: int = 2048
    max_new_tokens: int = 512  # largest max_new_tokens a request may ask for
    default_max_new_tokens: int = 128  # for requests that leave it unset (capped at max_new_tokens)
    max_stop_sequences: int = 8
    max_stop_length: int = 64  # characters per stop sequence

    def prompt_tokens(self, context: int) -> int:
        """The longest prompt a sequence of at most ``context`` tokens may have: ``max_prompt_tokens``, never
        more than leaves room for one new token (the one rule; the batcher and ModelInfo both use it)."""
        return min(self.max_prompt_tokens or context - 1, context - 1)

    def prompt_bytes(self, context: int, bytes_per_token: int) -> int:
        """The longest text prompt, in UTF-8 bytes, that can still fit: ``prompt_tokens`` tokens of at most
        ``bytes_per_token`` bytes (``Tokenizer.max_bytes_per_token``); longer texts are refused unread."""
        return self.prompt_tokens(context) * bytes_per_token

    def request_bytes(self, context: int, bytes_per_token: int) -> int:
        """The largest request message a valid request can need: the longest prompt (text, or token ids as
        varints of at most 5 bytes), every stop sequence at its longest (4 bytes a character), the request id,
        and 1 KiB for every other field and the framing, capped at ``MAX_RECEIVE_MESSAGE_BYTES``. The gRPC
        transport refuses anything larger (RESOURCE_EXHAUSTED) before reading it into memory."""
        prompt = max(self.prompt_bytes(context, bytes_per_token), 5 * self.prompt_tokens(context))
        stops = self.max_stop_sequences * (4 * self.max_stop_length + 4)
        return min(prompt + stops + 4 * MAX_REQUEST_ID + 1024, MAX_RECEIVE_MESSAGE_BYTES)

    def validate(self) -> None:
        for name in (
            "max_batch_size",
            "max_queue",
            "max_prefill_tokens",
            "max_new_tokens",
            "max_stop_sequences",
            "max_stop_length",
        ):
            value = getattr(self, name)
            if value <= 0:
                raise ValueError(f"--{name.replace('_', '-')} must be > 0, got {value}")
        for name in ("max_total_tokens", "max_prompt_tokens"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"--{name.replace('_', '-')} must be > 0, got {value}")


@dataclass(frozen=True)
class ServeConfig:
    """All that ``sparseinfer serve`` (or ``start_server``) needs; ``model=None`` serves the bundled model."""

    model: Path | None = None
    host: str = "127.0.0.1"
    port: int = 50051  # 0 picks a free port (tests); the handle reports the bound one
    sparsity: str = SparsityMode.DENSE  # the default mode of requests that do not choose one
    gpu_memory: int | None = None  # bytes for hot neurons on the fast device; None: no hot/cold placement
    limits: Limits = Limits()
    auth_token: str | None = None  # bearer token every RPC except health must carry
    tls_cert: Path | None = None
    tls_key: Path | None = None
    metrics_port: int | None = None  # Prometheus text endpoint on this port (0 picks one); None: off
    metrics_host: str = "127.0.0.1"
    # OpenAI-compatible HTTP API (serving/openai_api.py) on this port of ``host`` (0 picks one); None: off.
    # Off by default: a second listening port is a choice a deployment makes, not a surprise it finds.
    http_port: int | None = None
    grace_period: float = 10.0  # seconds SIGTERM waits for in-flight requests before cancelling them
    dtype: str | None = None  # compute dtype name (sparseinfer.model.config.DTYPES); None: the checkpoint's
    threads: int | None = None  # torch CPU threads; None: torch's default
    event_loop: str = DEFAULT_EVENT_LOOP  # one of EVENT_LOOPS
    dense_linear: str = "auto"  # kernel of the dense projections (model.linear); $SPARSEINFER_DENSE_LINEAR
    hugepages: bool = True  # CPU weights in huge pages (engine.hugepages); $SPARSEINFER_HUGEPAGES=0 turns off
    weights: str = "checkpoint"  # decoder weights: the checkpoint's dtype, or q8_0 | q4_0 (model.quant)

    def engine_config(self) -> EngineConfig:
        """The engine this server runs: its KV cache holds ``max_batch_size`` slots of the longest prompt
        plus the most new tokens (never more than the context), and requests may choose their mode."""
        from sparseinfer.engine.factory import EngineConfig
        from sparseinfer.engine.modes import SparsityConfig
        from sparseinfer.model.config import DTYPES

        lim = self.limits
        return EngineConfig(
            dtype=DTYPES[self.dtype] if self.dtype else None,
            max_batch=lim.max_batch_size,
            max_seq=lim.max_prompt_tokens + lim.max_new_tokens if lim.max_prompt_tokens else None,
            sparsity=SparsityConfig(mode=self.sparsity, gpu_memory=self.gpu_memory, hugepages=self.hugepages),
            per_request_modes=True,
            dense_linear=self.dense_linear,
            threads=self.threads,
            weights=self.weights,
        )

    def validate(self) -> None:
        self.limits.validate()
        if self.sparsity not in MODES:
            raise ValueError(f"--sparsity must be one of {', '.join(MODES)}, got {self.sparsity!r}")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"--port must be in [0, 65535], got {self.port}")
        if self.metrics_port is not None and not 0 <= self.metrics_port <= 65535:
            raise ValueError(f"--metrics-port must be in [0, 65535], got {self.metrics_port}")
        if self.http_port is not None and not 0 <= self.http_port <= 65535:
            raise ValueError(f"--http-port must be in [0, 65535], got {self.http_port}")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("--tls-cert and --tls-key must be given together")
        if self.grace_period < 0:
            raise ValueError(f"--grace-period must be >= 0 seconds, got {self.grace_period}")
        if self.auth_token is not None and not self.auth_token:
            raise ValueError("--auth-token must not be empty")
        if self.event_loop not in EVENT_LOOPS:
            raise ValueError(f"--event-loop must be one of {', '.join(EVENT_LOOPS)}, got {self.event_loop!r}")
        if not event_loop_installed(self.event_loop):
            raise ValueError(
                "--event-loop uvloop: uvloop is not installed (pip install uvloop, or pass asyncio)"
            )
