"""The load generator of `sparseinfer bench serve` (sparseinfer.bench.serve_load) against the scripted fake
server: request counts per pattern, token timing, error counting, and the percentile against numpy."""

from __future__ import annotations

import asyncio
import json
import math
import os
import subprocess
import sys

import grpc
import numpy as np
import pytest

from sparseinfer.bench.serve import BASELINE_ROUNDS, SCALING_PAIRS, format_table, load_configs
from sparseinfer.bench.serve_load import LoadConfig, RequestRecord, percentile, run_load, summarise
from sparseinfer_client import NO_RETRY, AsyncClient


@pytest.mark.parametrize("q", [0, 1, 50, 90, 99, 100])
@pytest.mark.parametrize("n", [1, 2, 7, 100])
def test_percentile_matches_numpy(q, n):
    values = list(np.random.default_rng(n).exponential(size=n))
    assert percentile(values, q) == pytest.approx(float(np.percentile(values, q)))
    assert math.isnan(percentile([], 50))


def _run(fake_server, config):
    async def go():
        async with AsyncClient(fake_server.target, retry=NO_RETRY) as client:
            return await run_load(client, config)

    return asyncio.run(go())


@pytest.mark.parametrize("mode", ["closed", "open"])
def test_runs_send_exactly_the_requests(fake_server, mode):
    config = LoadConfig(
        mode=mode, concurrency=3, rate=200.0, requests=7, warmup=2, max_new_tokens=4, stream_interval=2
    )
    records, wall = _run(fake_server, config)
    assert len(records) == 7 and wall > 0
    assert fake_server.servicer.attempts("GenerateStream") == 9  # + warm-up
    request = fake_server.servicer.calls[-1][2]
    assert request.details.tokens and request.stopping.ignore_eos and request.sampling.temperature == 0
    assert request.stream_interval == 2
    summary = summarise(records, wall, config)
    # The fake streams 3 one-token chunks per request, the last with the report (computed share 0.25).
    assert summary["succeeded"] == 7 and summary["errors"] == {}
    assert summary["output_tokens_per_s"] == pytest.approx(21 / wall)
    assert summary["mean_computed_share"] == pytest.approx(0.25)
    assert all(len(r.gaps) == 2 and r.tokens == 3 for r in records)  # gaps between tokens
    assert summary["ttft_s"]["p50"] <= summary["e2e_s"]["p50"]


def test_errors_are_counted_by_status(fake_server):
    fake_server.servicer.script.fail_first = [grpc.StatusCode.RESOURCE_EXHAUSTED] * 2
    config = LoadConfig(concurrency=1, requests=5, warmup=0)
    records, wall = _run(fake_server, config)
    summary = summarise(records, wall, config)
    assert summary["errors"] == {"RESOURCE_EXHAUSTED": 2} and summary["succeeded"] == 3


def test_summary_of_hand_made_records():
    records = [
        RequestRecord(sent=0.0, first_token=0.1, done=0.5, tokens=5, gaps=[0.1, 0.1, 0.1, 0.1],
                      computed_share=0.5, hot_share=1.0, server_per_token_s=0.1),
        RequestRecord(sent=0.2, first_token=0.5, done=0.9, tokens=5, gaps=[0.1, 0.1, 0.1, 0.1],
                      computed_share=0.3, hot_share=1.0, server_per_token_s=0.1),
        RequestRecord(sent=0.3, done=0.4, error="INVALID_ARGUMENT"),
    ]  # fmt: skip
    config = LoadConfig(concurrency=2)
    s = summarise(records, 1.0, config)
    assert s["requests_per_s"] == 2.0 and s["output_tokens_per_s"] == 10.0
    assert s["ttft_s"]["mean"] == pytest.approx(0.2) and s["e2e_s"]["p50"] == pytest.approx(0.6)
    assert s["tpot_s"]["mean"] == pytest.approx(0.1) and s["mean_computed_share"] == pytest.approx(0.4)
    assert s["errors"] == {"INVALID_ARGUMENT": 1}
    table = format_table({"meta": _meta(), "rows": [s]})
    assert "| closed, concurrency 2 | 2 / 3 | INVALID_ARGUMENT 1 | 2.00 | 10.0 |" in table


def _meta():
    return {
        "date": "d", "python": "3", "cpu": "c", "target": "t", "num_layers": 2, "max_batch_size": 8,
        "model": {"model_id": "m", "architecture": "llama", "activation": "relu2", "dtype": "float32"},
        "default_sparsity_mode": "dense", "config": {"max_new_tokens": 5}, "engine_baseline": None,
    }  # fmt: skip


def test_config_validation_and_defaults():
    import argparse

    from sparseinfer.bench.serve import register

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    args = parser.parse_args(["serve", "--target", "x:1", "--concurrency", "1,16"])
    configs = load_configs(args)
    assert [(c.mode, c.concurrency, c.requests) for c in configs] == [("closed", 1, 8), ("closed", 16, 48)]
    args = parser.parse_args(
        ["serve", "--target", "x:1", "--mode", "both", "--concurrency", "2", "--rate", "3,5"]
    )
    configs = load_configs(args)
    assert [(c.mode, c.concurrency, c.rate, c.requests) for c in configs] == [
        ("closed", 2, 1.0, 8), ("open", 1, 3.0, 32), ("open", 1, 5.0, 32)
    ]  # fmt: skip
    args = parser.parse_args(["serve", "--target", "x:1", "--max-new-tokens", "1"])
    with pytest.raises(ValueError, match="max-new-tokens"):
        load_configs(args)
    with pytest.raises(ValueError, match="rate"):
        LoadConfig(mode="open", rate=0).validate()
    args = parser.parse_args(["serve", "--target", "x:1", "--stream-interval", "0"])
    with pytest.raises(ValueError, match="stream-interval"):
        load_configs(args)


def test_bench_serve_end_to_end(tiny_random_checkpoint, tmp_path, capsys):
    """`sparseinfer bench serve --target ... --engine-baseline --results DIR` against a real server."""
    from sparseinfer.cli import main
    from sparseinfer.serving.config import ServeConfig
    from sparseinfer.serving.server import start_server

    handle = start_server(ServeConfig(model=tiny_random_checkpoint, port=0))
    try:
        argv = ["bench", "serve", "--target", f"127.0.0.1:{handle.port}", "--concurrency", "1,16",
                "--requests", "16", "--max-new-tokens", "4", "--model", str(tiny_random_checkpoint),
                "--engine-baseline", "--threads", "1", "--results", str(tmp_path)]  # fmt: skip
        assert main(argv) in (0, None)
    finally:
        handle.stop(grace=1.0)
    result = json.loads((tmp_path / "serve.json").read_text())
    rows = result["rows"]
    assert [(r["concurrency"], r["requests"], r["succeeded"]) for r in rows] == [(1, 16, 16), (16, 16, 16)]
    assert all(r["output_tokens_per_s"] > 0 and r["mean_computed_share"] == 1.0 for r in rows)
    base = result["meta"]["engine_baseline"]
    assert (
        base["rounds"] == BASELINE_ROUNDS
        and base["engine_per_token_s"] > 0
        and base["server_per_token_s"] > 0
    )
    q1, q3 = base["overhead_quartiles"]
    assert q1 <= base["overhead"] <= q3 and base["client_cpu_per_token_s"] > 0
    u1, u3 = base["unary_overhead_quartiles"]
    assert u1 <= base["unary_overhead"] <= u3
    assert len(base["server_unary_rounds_s"]) == len(base["engine_whole_rounds_s"]) == BASELINE_ROUNDS
    assert base["server_unary_per_token_s"] > 0 and base["engine_whole_per_token_s"] > 0
    pairs = result["meta"]["scaling_pairs"]
    assert len(pairs["ratios"]) == pairs["pairs"] == SCALING_PAIRS and all(r > 0 for r in pairs["ratios"])
    assert result["meta"]["scaling_16_vs_1"] == pytest.approx(sorted(pairs["ratios"])[SCALING_PAIRS // 2])
    table = (tmp_path / "serve.md").read_text()
    assert "| closed, concurrency 16 | 16 / 16 |" in table and "the server adds" in table
    assert "Unary Generate in the same rounds" in table
    assert table in capsys.readouterr().out


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two CPUs to split")
def test_client_cpus_split_and_pin_children():
    from sparseinfer.bench.serve import split_cpus
    from sparseinfer.bench.serve_baseline import pinned

    mine = sorted(os.sched_getaffinity(0))
    client, server = split_cpus(1)
    assert client == mine[-1:] and server == mine[:-1]
    with pytest.raises(SystemExit, match="client-cpus"):
        split_cpus(len(mine))
    code = pinned("import os; print(sorted(os.sched_getaffinity(0)))", server)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == str(server)
    assert pinned("pass", None) == "pass"


def test_client_cpus_needs_spawn():
    from sparseinfer.cli import main

    with pytest.raises(SystemExit, match="needs --spawn"):
        main(["bench", "serve", "--target", "x:1", "--client-cpus", "1"])
