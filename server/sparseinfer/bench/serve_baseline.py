"""The engine-alone side of ``sparseinfer bench serve --engine-baseline``: the same generation as the load
test's requests, on the engine without the server, in its own process, alternated with one-at-a-time requests
through the server so both see the same machine (it may be shared: a noisy neighbour then slows both alike).
The ratio of their times per output token is the server's overhead.

The engine round is awaited in a thread (``asyncio.to_thread``) rather than called on the event loop: with the
loop blocked while a ``grpc.aio`` channel was open, the engine process measured about 2× slower than the
server on this machine (apparently the blocked client burns CPU), which made the server look faster than the
engine it wraps."""

from __future__ import annotations

import asyncio
import json
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

from sparseinfer.bench.serve_load import LoadConfig, percentile, run_load


class EngineBaseline:
    """The engine alone, sized as the server sizes it (``max_batch`` KV-cache slots of ``max_seq`` positions,
    from its ModelInfo) but running one request: the same prompt, greedy, exactly ``max_new_tokens`` tokens.
    ``once()`` runs one generation and returns (decode seconds per token after the first, whole-request
    seconds per token: prefill included)."""

    def __init__(
        self,
        model_path: Path,
        prompt: str,
        max_new_tokens: int,
        sparsity: str | None,
        max_batch: int,
        max_seq: int,
        dtype: str | None = None,
    ) -> None:
        from sparseinfer.engine.factory import EngineConfig, load_engine
        from sparseinfer.engine.modes import SparsityConfig
        from sparseinfer.engine.sampling import SamplingParams
        from sparseinfer.model.config import DTYPES

        def build() -> None:
            # The server's own engine (serving.config.ServeConfig.engine_config), sized as ModelInfo says.
            config = EngineConfig(
                dtype=DTYPES[dtype] if dtype is not None else None,
                max_batch=max_batch,
                max_seq=max_seq,
                sparsity=SparsityConfig(mode=sparsity or "dense"),
                per_request_modes=True,
            )
            self.engine = load_engine(model_path, config)
            self.ids = self.engine.encode(prompt)
            self.params = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0, ignore_eos=True)

        # The server loads its model and decodes on one engine thread (serving.engine_thread: torch work on
        # two threads makes every parallel op slower); so does this baseline, on a worker thread of its own.
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="engine-baseline")
        self._worker.submit(build).result()
        self.once()  # warm-up: first-call allocations and caches

    def _generate(self) -> tuple[float, float]:
        stats = self.engine.generate(self.ids, self.params).stats
        return stats.decode_s / (stats.completion_tokens - 1), stats.total_s / stats.completion_tokens

    def once(self) -> tuple[float, float]:
        return self._worker.submit(self._generate).result()


def baseline_child() -> None:
    """Entry of the engine-baseline process: build ``EngineBaseline(**json argv[1])``, print "ready", then
    answer every stdin line with one generation's two times per token (see ``EngineBaseline.once``)."""
    kwargs = json.loads(sys.argv[1])
    threads = kwargs.pop("threads")
    if threads is not None:
        import torch

        torch.set_num_threads(threads)
    kwargs["model_path"] = Path(kwargs["model_path"])
    engine = EngineBaseline(**kwargs)
    print("ready", flush=True)
    for _ in sys.stdin:
        decode, whole = engine.once()
        print(f"{decode!r} {whole!r}", flush=True)


def pinned(entry: str, cpus: Sequence[int] | None) -> str:
    """Python source that runs ``entry`` on ``cpus`` only (None: wherever the OS puts it). The child pins
    itself: a pre-exec hook in the parent is unsafe once gRPC threads exist."""
    if cpus is None:
        return entry
    return f"import os; os.sched_setaffinity(0, {sorted(cpus)!r}); " + entry


class EngineProcess:
    """``EngineBaseline`` in its own process, like the server: the benchmark process (event loop, gRPC
    client threads) then cannot slow the engine down or the other way round."""

    def __init__(self, threads: int | None, cpus: Sequence[int] | None = None, **kwargs: Any) -> None:
        """``cpus``: run on these CPUs only (as the server runs under ``--client-cpus``)."""
        kwargs = {**kwargs, "model_path": str(kwargs["model_path"]), "threads": threads}
        entry = pinned("from sparseinfer.bench.serve_baseline import baseline_child; baseline_child()", cpus)
        self.proc = subprocess.Popen(
            [sys.executable, "-c", entry, json.dumps(kwargs)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        if self._line() != "ready":
            raise RuntimeError("the engine baseline process failed to start (see its messages above)")

    def _line(self) -> str:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the engine baseline process exited ({self.proc.wait()})")
        return line.strip()

    def once(self) -> tuple[float, float]:
        assert self.proc.stdin is not None
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()
        decode, whole = self._line().split()
        return float(decode), float(whole)

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        self.proc.wait(timeout=60)


def _process_cpu_s() -> float:
    """CPU seconds (user + system) this process has used, all threads."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


# Generations per side and round; the first of each is a warm-up: it follows the other side's turn, with
# caches holding the other process's data and idle worker threads asleep.
PER_ROUND = 3


async def _unary_per_token(client: Any, config: LoadConfig) -> float:
    """One unary Generate of the load's request; client-side seconds per output token, send to response."""
    t0 = time.perf_counter()
    result = await client.generate(
        config.prompt,
        max_new_tokens=config.max_new_tokens,
        temperature=0.0,
        ignore_eos=True,
        sparsity_mode=config.sparsity_mode,
        timeout=config.timeout_s,
    )
    return (time.perf_counter() - t0) / result.usage.generated_tokens


def _paired(server: list[float], engine: list[float]) -> tuple[float, list[float]]:
    """The median of the rounds' server/engine ratios minus one, and its quartiles likewise. Each round's
    pair ran back to back and sees one state of a shared machine (per-round times swung 3.6-6.4 ms here
    while the pairs' ratios stayed far closer), so the median ratio is the estimate."""
    ratios = [s / e for s, e in zip(server, engine, strict=True)]
    return statistics.median(ratios) - 1.0, [percentile(ratios, 25) - 1.0, percentile(ratios, 75) - 1.0]


async def interleaved(client: Any, engine: EngineProcess, config: LoadConfig, rounds: int) -> dict[str, Any]:
    """Engine alone and requests through the server, alternating ``rounds`` times: the machine may be shared,
    and a noisy neighbour then slows both alike. In each round each side runs PER_ROUND generations back to
    back and counts all but the first. Two comparisons:

    - streaming: time per token after the first token, from the client's arrival times, vs the engine's
      decode time per token after the first;
    - unary Generate: the whole call's time per output token (prefill included, no per-token messages) vs
      the engine's whole request per token.
    """
    warm = replace(config, mode="closed", concurrency=1, requests=PER_ROUND, warmup=0)
    engine_s, server_s, engine_whole_s, unary_s = [], [], [], []
    client_cpu_s, client_tokens = 0.0, 0
    for _ in range(rounds):
        engine_runs = [await asyncio.to_thread(engine.once) for _ in range(PER_ROUND)]  # loop stays free
        engine_s.append(statistics.median(run[0] for run in engine_runs[1:]))
        engine_whole_s.append(statistics.median(run[1] for run in engine_runs[1:]))
        cpu0 = _process_cpu_s()
        records, _ = await run_load(client, warm)
        client_cpu_s += _process_cpu_s() - cpu0
        tpots = [r.time_per_output_token for r in records[1:]]
        failed = [r.error for r in records if r.error is not None]
        if failed or any(t is None for t in tpots):
            raise RuntimeError(f"baseline request failed: {failed}")
        server_s.append(statistics.median(t for t in tpots if t is not None))
        client_tokens += sum(r.tokens for r in records)
        unary = [await _unary_per_token(client, config) for _ in range(PER_ROUND)]
        unary_s.append(statistics.median(unary[1:]))
    overhead, quartiles = _paired(server_s, engine_s)
    unary_overhead, unary_quartiles = _paired(unary_s, engine_whole_s)
    return {
        "rounds": rounds,
        "engine_per_token_s": statistics.median(engine_s),
        "server_per_token_s": statistics.median(server_s),
        "overhead": overhead,
        "overhead_quartiles": quartiles,
        "engine_whole_per_token_s": statistics.median(engine_whole_s),
        "server_unary_per_token_s": statistics.median(unary_s),
        "unary_overhead": unary_overhead,
        "unary_overhead_quartiles": unary_quartiles,
        # CPU the load generator itself (this process: asyncio loop and gRPC threads) spent per streamed token
        # during the server rounds: on a small machine it competes with the server for the same cores.
        "client_cpu_per_token_s": client_cpu_s / max(1, client_tokens),
        "engine_rounds_s": engine_s,
        "server_rounds_s": server_s,
        "engine_whole_rounds_s": engine_whole_s,
        "server_unary_rounds_s": unary_s,
    }
