"""The load generator of ``sparseinfer bench serve``: streaming requests from one asyncio client, timed on the
client side, summarised as latency percentiles, throughput, errors by status and mean request sparsity.

Two arrival patterns:
- closed loop: ``concurrency`` workers, each sends its next request as soon as its previous one ends (the
  server sees exactly that many requests in flight; throughput is what it sustains);
- open loop: requests arrive as a Poisson process at ``rate`` per second whatever the server's state (a
  server slower than the rate builds a queue; latency and RESOURCE_EXHAUSTED errors show it).

Every request streams with per-token details on, so each token's arrival is timed: TTFT = send → first token;
inter-token latency = gaps between successive tokens (a message with k tokens counts k gaps of its gap / k);
end-to-end = send → final message. Requests are greedy with ``ignore_eos`` so each generates exactly
``max_new_tokens`` tokens and runs are comparable.
"""

from __future__ import annotations

import asyncio
import math
import random
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class LoadConfig:
    mode: str = "closed"  # "closed" | "open"
    concurrency: int = 1  # closed loop: requests in flight
    rate: float = 1.0  # open loop: arrivals per second
    requests: int = 16  # requests per run (after warm-up)
    warmup: int = 1  # requests sent (one at a time) before measuring; not counted
    max_new_tokens: int = 32
    prompt: str = "The quick brown fox jumps over the lazy dog. Once upon a time"
    sparsity_mode: str | None = None  # None: the server's default
    timeout_s: float = 300.0
    seed: int = 0  # open-loop arrival times
    stream_interval: int = 1  # tokens per streamed message after the first (GenerateRequest.stream_interval)

    def validate(self) -> None:
        if self.mode not in ("closed", "open"):
            raise ValueError(f"--mode must be closed or open, got {self.mode!r}")
        if self.concurrency < 1:
            raise ValueError(f"--concurrency must be ≥ 1, got {self.concurrency}")
        if not self.rate > 0:
            raise ValueError(f"--rate must be > 0 requests/s, got {self.rate}")
        if self.requests < 1 or self.warmup < 0:
            raise ValueError("--requests must be ≥ 1 and --warmup ≥ 0")
        if self.max_new_tokens < 2:
            raise ValueError("--max-new-tokens must be ≥ 2 (inter-token latency needs two tokens)")
        if self.stream_interval < 1:
            raise ValueError(f"--stream-interval must be ≥ 1, got {self.stream_interval}")


@dataclass
class RequestRecord:
    """One request as the client saw it (times from ``time.perf_counter``)."""

    sent: float
    first_token: float | None = None
    done: float | None = None
    tokens: int = 0
    gaps: list[float] = field(default_factory=list)
    error: str | None = None  # gRPC status name when the call failed
    computed_share: float | None = None
    hot_share: float | None = None
    server_per_token_s: float | None = None

    @property
    def time_per_output_token(self) -> float | None:
        if self.done is None or self.first_token is None or self.tokens < 2:
            return None
        return (self.done - self.first_token) / (self.tokens - 1)


async def _one(client: Any, config: LoadConfig, index: int) -> RequestRecord:
    from sparseinfer_client import SparseInferError

    record = RequestRecord(sent=time.perf_counter())
    last = record.sent
    try:
        stream = client.generate_stream(
            config.prompt,
            max_new_tokens=config.max_new_tokens,
            temperature=0.0,
            ignore_eos=True,
            sparsity_mode=config.sparsity_mode,
            request_id=f"bench-{index}",
            return_tokens=True,
            timeout=config.timeout_s,
            stream_interval=config.stream_interval,
        )
        async for chunk in stream:
            now = time.perf_counter()
            n = len(chunk.tokens)
            if n:
                if record.first_token is None:
                    record.first_token = now
                    record.gaps.extend([0.0] * (n - 1))
                else:
                    record.gaps.extend([(now - last) / n] * n)
                record.tokens += n
                last = now
            if chunk.finished:
                record.done = now
                record.computed_share = chunk.sparsity.computed_share
                record.hot_share = chunk.sparsity.hot_share
                record.server_per_token_s = chunk.timings.per_token_s
    except SparseInferError as error:
        record.error = error.code.name if error.code is not None else "CLIENT"
        record.done = time.perf_counter()
    return record


async def run_load(
    client: Any, config: LoadConfig, on_start: Callable[[], None] | None = None
) -> tuple[list[RequestRecord], float]:
    """Run one measurement with an ``AsyncClient``; return the records and the wall time (first send → last
    completion). ``on_start`` is called after the warm-up, just before the measured requests (the bench
    snapshots per-replica counters there)."""
    for i in range(config.warmup):
        await _one(client, config, -1 - i)
    if on_start is not None:
        on_start()
    start = time.perf_counter()
    if config.mode == "closed":
        queue = iter(range(config.requests))
        records: list[RequestRecord] = []

        async def worker() -> None:
            for index in queue:  # the shared iterator hands each index to exactly one worker
                records.append(await _one(client, config, index))

        await asyncio.gather(*(worker() for _ in range(min(config.concurrency, config.requests))))
    else:
        rng = random.Random(config.seed)
        tasks = []
        for index in range(config.requests):
            tasks.append(asyncio.create_task(_one(client, config, index)))
            if index + 1 < config.requests:
                await asyncio.sleep(rng.expovariate(config.rate))
        records = list(await asyncio.gather(*tasks))
    ends = [r.done for r in records if r.done is not None]
    return records, (max(ends) if ends else time.perf_counter()) - start


def percentile(values: Sequence[float], q: float) -> float:
    """q-th percentile (0 ≤ q ≤ 100), linear interpolation between order statistics (numpy's default)."""
    if not values:
        return math.nan
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100.0
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def _dist(values: Sequence[float]) -> dict[str, float]:
    return {
        "mean": sum(values) / len(values) if values else math.nan,
        "p50": percentile(values, 50),
        "p90": percentile(values, 90),
        "p99": percentile(values, 99),
    }


def summarise(records: Sequence[RequestRecord], wall_s: float, config: LoadConfig) -> dict[str, Any]:
    """Latency distributions (seconds), throughput and errors of one run."""
    ok = [r for r in records if r.error is None and r.done is not None]
    errors = Counter(r.error for r in records if r.error is not None)
    tokens = sum(r.tokens for r in ok)
    shares = [r.computed_share for r in ok if r.computed_share is not None]
    hot = [r.hot_share for r in ok if r.hot_share is not None]
    tpot = [t for r in ok if (t := r.time_per_output_token) is not None]
    return {
        "mode": config.mode,
        "concurrency": config.concurrency if config.mode == "closed" else None,
        "rate": config.rate if config.mode == "open" else None,
        "requests": len(records),
        "succeeded": len(ok),
        "errors": dict(sorted(errors.items())),
        "wall_s": wall_s,
        "requests_per_s": len(ok) / wall_s if wall_s > 0 else math.nan,
        "output_tokens_per_s": tokens / wall_s if wall_s > 0 else math.nan,
        "ttft_s": _dist([r.first_token - r.sent for r in ok if r.first_token is not None]),
        "itl_s": _dist([g for r in ok for g in r.gaps]),
        "tpot_s": _dist(tpot),
        "e2e_s": _dist([r.done - r.sent for r in ok if r.done is not None]),
        "server_per_token_s": _dist([r.server_per_token_s for r in ok if r.server_per_token_s is not None]),
        "mean_computed_share": sum(shares) / len(shares) if shares else None,
        "mean_hot_share": sum(hot) / len(hot) if hot else None,
    }
