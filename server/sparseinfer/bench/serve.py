"""``sparseinfer bench serve``: load-test a gRPC server with the Python client (see ``serve_load.py`` for the
load patterns and what is timed), against ``--target HOST:PORT`` or a server it starts itself (``--spawn``,
serving ``--model`` or the bundled model in a child process). ``--target`` may name several replicas (IP:PORT
list, or ``dns:///NAME:PORT``): the client spreads the load with gRPC's round_robin and health checking, the
main table is all replicas together, and a second table gives each replica's calls and share
(``serve_replicas.py``).

Closed loop runs once per ``--concurrency`` value (default 1 and 16), open loop once per ``--rate``. With
``--engine-baseline`` (needs the model locally: ``--spawn`` or ``--model``) the same generation (prompt,
greedy, ``max_new_tokens`` tokens) also runs on the engine alone in a process of its own, alternating with
single requests through the server, and the report compares their times per output token: the server's
overhead (``serve_baseline.py``).

``--client-cpus N`` keeps the load generator off the server's CPUs: this process runs on the last N CPUs it
may use, the spawned server and the engine baseline on the others (torch threads = their count). On a small
machine a co-located load generator otherwise takes its CPU from the engine's threads, and the comparison
charges that to the server.
Output: a markdown table on stdout and, with ``--results DIR``, ``DIR/NAME.json`` and ``DIR/NAME.md``
(``--name``, default serve).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import json
import os
import platform
import shlex
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, TextIO

from sparseinfer.bench.machine import cpu_model
from sparseinfer.bench.serve_baseline import PER_ROUND, EngineProcess, interleaved, pinned
from sparseinfer.bench.serve_load import LoadConfig, percentile, run_load, summarise
from sparseinfer.bench.serve_replicas import ReplicaMeter, format_replicas
from sparseinfer.serving.config import DEFAULT_EVENT_LOOP, event_loop_installed, new_event_loop

# Rounds of engine alone vs through the server: enough that the median of their paired ratios is steady on
# a noisy machine (seven single-request rounds gave -10% to +16% for the same code).
BASELINE_ROUNDS = 21
# Pairs of (1 client, 16 clients) runs behind the scaling figure.
SCALING_PAIRS = 5
SERVE_ENTRY = "import sys; from sparseinfer.cli import main; sys.exit(main())"


def split_cpus(client_cpus: int) -> tuple[list[int], list[int]]:
    """(load generator's CPUs, server's CPUs): the last ``client_cpus`` of the CPUs this process may use,
    and the rest."""
    cpus = sorted(os.sched_getaffinity(0))
    if not 0 < client_cpus < len(cpus):
        raise SystemExit(f"--client-cpus must be in [1, {len(cpus) - 1}] on this machine ({len(cpus)} CPUs)")
    return cpus[-client_cpus:], cpus[:-client_cpus]


def _client_module() -> Any:
    try:
        import sparseinfer_client
    except ImportError:
        raise SystemExit(
            "sparseinfer bench serve needs the Python client: pip install -e client  (distribution "
            "sparseinfer-client)"
        ) from None
    return sparseinfer_client


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def spawn_server(
    model: Path | None,
    sparsity: str | None,
    server_args: Sequence[str],
    err: TextIO,
    ready_s: float = 600.0,
    cpus: Sequence[int] | None = None,
) -> Iterator[str]:
    """Start ``sparseinfer serve`` on a free local port in a child process (on ``cpus`` only, when given);
    yield its target once healthy; SIGTERM it (graceful drain) on exit."""
    client_mod = _client_module()
    port = _free_port()
    entry = pinned(SERVE_ENTRY, cpus)
    cmd = [sys.executable, "-c", entry, "serve", "--host", "127.0.0.1", "--port", str(port)]
    if model is not None:
        cmd += ["--model", str(model)]
    if sparsity is not None:
        cmd += ["--sparsity", sparsity]
    cmd += list(server_args)
    err.write(f"starting: {shlex.join(cmd[3:])}\n")
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=sys.stderr)
    target = f"127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + ready_s
        with client_mod.Client(target, retry=client_mod.NO_RETRY) as client:
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"the server exited with status {proc.returncode} before it was ready")
                with contextlib.suppress(client_mod.SparseInferError):
                    if client.health(timeout=2.0) == "SERVING":
                        break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the server was not SERVING within {ready_s:.0f} s")
                time.sleep(0.2)
        yield target
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


async def _runs(
    target: str,
    client_kwargs: dict[str, Any],
    configs: Sequence[LoadConfig],
    engine_model: Path | None,
    threads: int | None,
    engine_cpus: Sequence[int] | None,
) -> tuple[dict[str, Any], list[dict[str, Any]], dict[str, Any] | None, dict[str, Any] | None, str | None]:
    """(model info, one summary row per config, engine baseline, scaling pairs, and the gRPC target when
    the client balanced over several replicas, else None)."""
    client_mod = _client_module()
    rows = []
    async with client_mod.AsyncClient(target, **client_kwargs) as client:
        await client.wait_ready(30.0)
        info = asdict(await client.model_info())
        # Several replicas: gRPC balances, the bench only counts who answered (serve_replicas.py).
        meter = ReplicaMeter(client.target) if client.load_balanced else None
        balanced_target = client.target if client.load_balanced else None
        for config in configs:
            records, wall = await run_load(client, config, meter.start if meter is not None else None)
            row = summarise(records, wall, config)
            if meter is not None:
                row["replicas"] = meter.shares()
            rows.append(row)
        scaling = await _paired_scaling(client, configs)
        baseline = None
        if engine_model is not None:
            c = configs[0]
            engine = EngineProcess(
                threads,
                engine_cpus,
                model_path=engine_model,
                prompt=c.prompt,
                max_new_tokens=c.max_new_tokens,
                # As the server runs it: its compute dtype and, for requests without a mode, its default mode.
                dtype=info["dtype"],
                sparsity=c.sparsity_mode or info["default_sparsity_mode"],
                max_batch=info["limits"]["max_batch_size"],
                max_seq=info["max_context"],
            )
            try:
                baseline = await interleaved(client, engine, c, rounds=BASELINE_ROUNDS)
            finally:
                engine.close()
    return info, rows, baseline, scaling, balanced_target


async def _paired_scaling(client: Any, configs: Sequence[LoadConfig]) -> dict[str, Any] | None:
    """Output tokens/s at 16 closed-loop clients over that at 1, from SCALING_PAIRS back-to-back pairs of
    runs (a shared machine drifts between the table's runs; a pair sees one state of it). None unless both
    closed-loop concurrencies 1 and 16 are configured."""
    closed = {c.concurrency: c for c in configs if c.mode == "closed"}
    if 1 not in closed or 16 not in closed:
        return None
    ratios = []
    for _ in range(SCALING_PAIRS):
        rates = []
        for c in (closed[1], closed[16]):
            run = replace(c, warmup=0)
            records, wall = await run_load(client, run)
            rates.append(summarise(records, wall, run)["output_tokens_per_s"])
        ratios.append(rates[1] / rates[0])
    return {
        "pairs": SCALING_PAIRS,
        "median": statistics.median(ratios),
        "quartiles": [percentile(ratios, 25), percentile(ratios, 75)],
        "ratios": ratios,
    }


def run_serve_bench(
    target: str,
    configs: Sequence[LoadConfig],
    client_kwargs: dict[str, Any],
    engine_model: Path | None = None,
    threads: int | None = None,
    cpus: tuple[list[int], list[int]] | None = None,
) -> dict[str, Any]:
    """Run every load config against ``target``; with ``engine_model``, also the interleaved engine-alone
    comparison (see ``EngineBaseline``). ``cpus``: (load generator's, server's and engine's) when split."""
    engine_cpus = cpus[1] if cpus is not None else None
    # The load generator on the server's default loop when it can: CPU it spends per streamed token is
    # CPU the server loses when they share cores.
    loop_kind = DEFAULT_EVENT_LOOP if event_loop_installed(DEFAULT_EVENT_LOOP) else "asyncio"
    with asyncio.Runner(loop_factory=lambda: new_event_loop(loop_kind)) as runner:
        info, rows, baseline, scaling, balanced_target = runner.run(
            _runs(target, client_kwargs, configs, engine_model, threads, engine_cpus)
        )
    meta: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "python": platform.python_version(),
        "cpu": cpu_model(),
        "target": target,
        "model": {k: info[k] for k in ("model_id", "architecture", "activation", "dtype")},
        "num_layers": info["num_layers"],
        "max_batch_size": info["limits"]["max_batch_size"],
        "default_sparsity_mode": info["default_sparsity_mode"],
        "config": asdict(configs[0]),
        "client_event_loop": loop_kind,
        "engine_baseline": baseline,
        "scaling_pairs": scaling,
        "cpus": None,
    }
    if cpus is not None:
        meta["cpus"] = {"load_generator": cpus[0], "server": cpus[1], "threads": threads}
    if balanced_target is not None:  # several replicas (absent for one server: its report as before)
        meta["load_balancing"] = {"grpc_target": balanced_target, "policy": "round_robin", "health": True}
    closed = {row["concurrency"]: row for row in rows if row["mode"] == "closed"}
    if scaling is not None:
        meta["scaling_16_vs_1"] = scaling["median"]
        meta["scaling_from_table"] = closed[16]["output_tokens_per_s"] / closed[1]["output_tokens_per_s"]
    return {"meta": meta, "rows": rows}


def _ms(dist: dict[str, float], key: str) -> str:
    return f"{dist[key] * 1000:.1f}"


def format_table(result: dict[str, Any]) -> str:
    meta, rows = result["meta"], result["rows"]
    c = meta["config"]
    client_loop = meta.get("client_event_loop", "asyncio")  # absent from results written before it existed
    lines = [
        f"# gRPC server under load (client: sparseinfer_client.AsyncClient on {client_loop}, "
        "streaming "
        + (
            "one message per token)"
            if c.get("stream_interval", 1) == 1
            else f"the first token, then {c['stream_interval']} tokens per message)"
        ),
        "",
        f"{meta['date']} · Python {meta['python']} · {meta['cpu']} · " + _servers(meta),
        "",
        f"Model {meta['model']['model_id']} ({meta['model']['architecture']}, {meta['model']['activation']}, "
        f"{meta['num_layers']} layers, {meta['model']['dtype']}); server max batch {meta['max_batch_size']}, "
        f"default sparsity {meta['default_sparsity_mode']}. Every request: the same prompt, greedy, "
        f"exactly {c['max_new_tokens']} new tokens (ignore_eos). Latencies in ms as p50 / p90 / p99.",
        "",
        _cpu_sentence(meta.get("cpus")),
        "",
        "| load | ok / sent | errors | req/s | out tok/s | TTFT | inter-token | end-to-end | computed |",
        "|---|---:|---|---:|---:|---|---|---|---:|",
    ]
    for row in rows:
        load = _load(row)
        errors = ", ".join(f"{k} {v}" for k, v in row["errors"].items()) or "—"
        dists = [
            " / ".join(_ms(row[key], q) for q in ("p50", "p90", "p99"))
            for key in ("ttft_s", "itl_s", "e2e_s")
        ]
        share = row["mean_computed_share"]
        lines.append(
            f"| {load} | {row['succeeded']} / {row['requests']} | {errors} | {row['requests_per_s']:.2f} | "
            f"{row['output_tokens_per_s']:.1f} | {dists[0]} | {dists[1]} | {dists[2]} | "
            + (f"{share:.1%}" if share is not None else "—")
            + " |"
        )
    lines.append("")
    lines += format_replicas(rows, _load)
    if "scaling_16_vs_1" in meta:
        pairs = meta["scaling_pairs"]
        lines.append(
            f"Output tokens/s at 16 clients / at 1 client: {meta['scaling_16_vs_1']:.2f}× (target ≥ 4×), the "
            f"median of {pairs['pairs']} back-to-back pairs of runs (quartiles "
            f"{pairs['quartiles'][0]:.2f}× / {pairs['quartiles'][1]:.2f}×; the table's two rows give "
            f"{meta['scaling_from_table']:.2f}×)."
        )
    base = meta["engine_baseline"]
    if base is not None:
        server_ms, engine_ms = base["server_per_token_s"] * 1000, base["engine_per_token_s"] * 1000
        q1, q3 = base.get("overhead_quartiles", (base["overhead"], base["overhead"]))
        lines += [
            f"Time per output token, one request at a time: {server_ms:.2f} ms through the server",
            f"(client-side, after the first token) vs {engine_ms:.2f} ms for the engine alone in its own",
            "process (same prompt, tokens and KV-cache size, one request at a time), medians of "
            f"{base['rounds']} interleaved rounds (each side {PER_ROUND} generations a round, the first a "
            "warm-up); the median of the rounds' paired ratios: the server adds "
            f"{base['overhead']:+.1%} (target ≤ +10%; quartiles {q1:+.1%} / {q3:+.1%}).",
        ]
        if "unary_overhead" in base:
            u1, u3 = base["unary_overhead_quartiles"]
            lines.append(
                "Unary Generate in the same rounds (one response per request, no per-token messages): "
                f"{base['server_unary_per_token_s'] * 1000:.2f} ms per output token from send to response vs "
                f"{base['engine_whole_per_token_s'] * 1000:.2f} ms for the engine's whole request (prefill "
                f"included); the server adds {base['unary_overhead']:+.1%} (quartiles {u1:+.1%} / "
                f"{u3:+.1%})."
            )
        if "client_cpu_per_token_s" in base:
            lines.append(
                f"The load generator used {base['client_cpu_per_token_s'] * 1000:.2f} ms of CPU per streamed "
                "token (its event loop and gRPC threads)"
                + (
                    ", on CPUs of its own."
                    if meta.get("cpus")
                    else ", CPU the server had to share with it and the engine alone did not."
                )
            )
    if meta.get("note"):
        lines += ["", meta["note"]]
    return "\n".join(lines) + "\n"


def _load(row: dict[str, Any]) -> str:
    return (
        f"closed, concurrency {row['concurrency']}" if row["mode"] == "closed" else f"open, λ={row['rate']}/s"
    )


def _servers(meta: dict[str, Any]) -> str:
    if "load_balancing" not in meta:
        return f"server {meta['target']}"
    return f"servers {meta['target']} (gRPC round_robin, client-side health checking)"


def _cpu_sentence(cpus: dict[str, Any] | None) -> str:
    if cpus is None:
        return "Load generator, server and engine baseline shared all the machine's CPUs."
    return (
        f"The load generator ran on CPU {', '.join(map(str, cpus['load_generator']))}; the server and the "
        f"engine baseline on CPU {', '.join(map(str, cpus['server']))} with {cpus['threads']} torch "
        "thread(s) (--client-cpus)."
    )


def write_results(result: dict[str, Any], directory: Path, name: str = "serve") -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    (directory / f"{name}.md").write_text(format_table(result))


def _numbers(kind: type, text: str) -> list[Any]:
    try:
        return [kind(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def register(bench_sub: argparse._SubParsersAction) -> None:
    p = bench_sub.add_parser("serve", help="load-test the gRPC server: latency percentiles, throughput")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument(
        "--target",
        help="HOST:PORT of a running server; replicas: several IP:PORT comma-separated, or dns:///NAME:PORT "
        "(round_robin with health checking; the report gives each replica's share)",
    )
    where.add_argument("--spawn", action="store_true", help="start `sparseinfer serve` in a child process")
    p.add_argument("--model", type=Path, default=None, help="checkpoint for --spawn/--engine-baseline")
    p.add_argument("--sparsity", default=None, help="sparsity mode of every request (default: server's)")
    p.add_argument("--mode", choices=("closed", "open", "both"), default="closed", help="arrival pattern(s)")
    p.add_argument("--concurrency", type=lambda t: _numbers(int, t), default=[1, 16], help="e.g. 1,4,16")
    p.add_argument("--rate", type=lambda t: _numbers(float, t), default=[1.0], help="open loop: req/s list")
    p.add_argument("--requests", type=int, default=None, help="per run (default: 3×concurrency, ≥ 8)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument(
        "--stream-interval",
        type=int,
        default=1,
        help="tokens per streamed message after the first (default 1)",
    )
    p.add_argument("--prompt", default=LoadConfig().prompt)
    p.add_argument("--timeout", type=float, default=300.0, help="seconds per request")
    p.add_argument("--token", default=None, help="bearer token")
    p.add_argument("--root-certs", default=None, help="PEM root certificates (TLS)")
    p.add_argument("--engine-baseline", action="store_true", help="also time the engine alone (needs model)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads of server and baseline")
    p.add_argument("--server-arg", action="append", default=[], help="extra `serve` flag (--spawn; repeat)")
    p.add_argument(
        "--client-cpus",
        type=int,
        default=None,
        help="run the load generator on the last N CPUs, the spawned server and baseline on the rest",
    )
    p.add_argument("--results", type=Path, default=None, help="write NAME.json and NAME.md into DIR")
    p.add_argument("--name", default="serve", help="file name stem of --results (default serve)")
    p.add_argument("--note", default=None, help="a sentence added to the report (e.g. the machine's state)")
    p.set_defaults(run=_run)


def load_configs(args: argparse.Namespace) -> list[LoadConfig]:
    base = LoadConfig(
        warmup=args.warmup,
        max_new_tokens=args.max_new_tokens,
        prompt=args.prompt,
        sparsity_mode=args.sparsity,
        timeout_s=args.timeout,
        stream_interval=args.stream_interval,
    )
    configs = []
    if args.mode in ("closed", "both"):
        configs += [
            replace(base, mode="closed", concurrency=n, requests=args.requests or max(8, 3 * n))
            for n in args.concurrency
        ]
    if args.mode in ("open", "both"):
        configs += [replace(base, mode="open", rate=r, requests=args.requests or 32) for r in args.rate]
    for config in configs:
        config.validate()
    return configs


def _run(args: argparse.Namespace, env: object) -> None:
    configs = load_configs(args)
    client_kwargs: dict[str, Any] = {"token": args.token, "root_certificates": args.root_certs}
    model = args.model
    if model is None and (args.spawn or args.engine_baseline):
        with contextlib.suppress(ImportError, FileNotFoundError):
            from sparseinfer.model.bundled import bundled_model_path

            model = bundled_model_path()
    cpus = None
    threads = args.threads
    if args.client_cpus is not None:
        if not args.spawn:
            raise SystemExit("--client-cpus needs --spawn (it places the server it starts)")
        cpus = split_cpus(args.client_cpus)
        os.sched_setaffinity(0, cpus[0])  # this thread, and every thread it starts from now on
        threads = threads if threads is not None else len(cpus[1])
    server_args = list(args.server_arg)
    if threads is not None:
        server_args += ["--threads", str(threads)]
    engine_model = None
    if args.engine_baseline:
        if model is None:
            raise SystemExit("--engine-baseline needs the model: pass --model (no bundled model found)")
        engine_model = model
    if args.spawn:
        server_cpus = cpus[1] if cpus is not None else None
        with spawn_server(model, args.sparsity, server_args, sys.stderr, cpus=server_cpus) as target:
            result = run_serve_bench(target, configs, client_kwargs, engine_model, threads, cpus)
    else:
        result = run_serve_bench(args.target, configs, client_kwargs, engine_model, threads)
    if args.note:
        result["meta"]["note"] = args.note
    sys.stdout.write(format_table(result) + "\n")
    if args.results is not None:
        write_results(result, args.results, args.name)
