"""`sparseinfer bench serve --target A,B,...`: the load spread by gRPC over the replicas, each replica's share
counted from the client channel (channelz), checked against what each scripted replica actually received."""

from __future__ import annotations

import json

import pytest
from client_fakes import start_fake_server

from sparseinfer.bench.serve_replicas import Calls, format_replicas, replica_shares
from sparseinfer_client._targets import HEALTH_SERVICE


@pytest.fixture
def replicas():
    servers = [start_fake_server() for _ in range(3)]
    for server in servers:
        server.health.set(HEALTH_SERVICE, 1)  # SERVING
    yield servers
    for server in servers:
        server.stop()


def _bench(target: str, tmp_path, *extra: str) -> dict:
    from sparseinfer.cli import main

    argv = ["bench", "serve", "--target", target, "--concurrency", "3", "--requests", "12", "--warmup", "0",
            "--max-new-tokens", "4", "--results", str(tmp_path), *extra]  # fmt: skip
    assert main(argv) in (0, None)
    return json.loads((tmp_path / "serve.json").read_text())


def test_bench_reports_each_replicas_share_and_the_aggregate(replicas, tmp_path, capsys):
    target = ",".join(s.target for s in replicas)
    result = _bench(target, tmp_path)
    row = result["rows"][0]
    assert row["succeeded"] == 12 and row["errors"] == {}  # the aggregate: every replica together
    shares = row["replicas"]
    received = {s.target: s.servicer.attempts("GenerateStream") for s in replicas}
    assert {a: v["ok"] for a, v in shares.items()} == received  # the client's count is each server's own
    assert sum(received.values()) == 12 and all(received.values())
    assert sum(v["share"] for v in shares.values()) == pytest.approx(1.0)
    meta = result["meta"]
    assert meta["load_balancing"]["policy"] == "round_robin" and meta["target"] == target
    table = (tmp_path / "serve.md").read_text()
    assert "| closed, concurrency 3 | 12 / 12 |" in table and "Per replica" in table
    for address, v in shares.items():
        assert f"{v['ok']} ({v['share']:.0%})" in table and address in table
    assert table in capsys.readouterr().out


def test_one_target_keeps_its_report(replicas, tmp_path):
    result = _bench(replicas[0].target, tmp_path)
    assert "replicas" not in result["rows"][0] and "load_balancing" not in result["meta"]
    table = (tmp_path / "serve.md").read_text()
    assert "Per replica" not in table and f"server {replicas[0].target}" in table


def test_shares_between_snapshots():
    before = {"a:1": Calls(3, 1), "b:1": Calls(0, 0)}
    after = {"a:1": Calls(9, 1), "b:1": Calls(2, 1), "c:1": Calls(4, 0)}
    shares = replica_shares(before, after)
    got = {a: (v["ok"], v["failed"]) for a, v in shares.items()}
    assert got == {"a:1": (6, 0), "b:1": (2, 1), "c:1": (4, 0)}
    assert shares["a:1"]["share"] == pytest.approx(0.5)
    assert replica_shares(None, after) is None
    lines = format_replicas([{"mode": "open", "rate": 2.0, "replicas": None}], lambda r: "open")
    assert "unknown" in lines[0]
