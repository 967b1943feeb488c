"""Which replica answered how many calls of a load-balanced ``bench serve`` run.

gRPC Python gives a client call no peer address, and the server's replies name no replica, so the count comes
from gRPC's own bookkeeping: channelz keeps per-subchannel (per-address) counters of calls started, succeeded
and failed. The load generator reads them for its channel before and after a run; the difference is what each
replica answered. grpcio exposes channelz as the ``channelz_*`` functions of its Cython core (the
grpcio-channelz service is a thin wrapper over them); a grpcio without them gives no per-replica figures,
never a wrong one.

Counters are per subchannel, and gRPC shares a subchannel between the channels of one process that reach the
same address with the same arguments: another busy channel to the same replicas in this process would be
counted too. The bench has only its own.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Calls:
    succeeded: int = 0
    failed: int = 0

    def __sub__(self, other: Calls) -> Calls:
        return Calls(self.succeeded - other.succeeded, self.failed - other.failed)


def _core() -> Any | None:
    try:
        from grpc._cython import cygrpc
    except ImportError:  # pragma: no cover - every grpcio wheel has it
        return None
    needed = ("channelz_get_top_channels", "channelz_get_subchannel")
    return cygrpc if all(hasattr(cygrpc, name) for name in needed) else None


def _top_channels(core: Any) -> list[dict[str, Any]]:
    channels: list[dict[str, Any]] = []
    start = 0
    while True:  # channelz answers in pages; "end" marks the last
        page = json.loads(core.channelz_get_top_channels(start))
        got = page.get("channel", [])
        channels += got
        if page.get("end", True) or not got:
            return channels
        start = max(int(c["ref"]["channelId"]) for c in got) + 1


def subchannel_calls(target: str) -> dict[str, Calls] | None:
    """{replica address: calls so far} over this process's channels whose target is ``target`` (the
    client's ``.target``, as gRPC spells it); None when this grpcio exposes no channelz."""
    core = _core()
    if core is None:
        return None
    try:
        counts: dict[str, Calls] = {}
        for channel in _top_channels(core):
            if channel.get("data", {}).get("target") != target:
                continue
            for ref in channel.get("subchannelRef", []):
                sub = json.loads(core.channelz_get_subchannel(int(ref["subchannelId"])))["subchannel"]["data"]
                address = _address(sub.get("target", ""))
                seen = counts.get(address, Calls())
                counts[address] = Calls(
                    seen.succeeded + int(sub.get("callsSucceeded", 0)),
                    seen.failed + int(sub.get("callsFailed", 0)),
                )
        return counts
    except (ValueError, KeyError, TypeError, RuntimeError):
        return None  # channelz's JSON changed shape: no figures rather than wrong ones


def _address(subchannel_target: str) -> str:
    for scheme in ("ipv4:", "ipv6:"):
        if subchannel_target.startswith(scheme):
            return subchannel_target[len(scheme) :]
    return subchannel_target


def replica_shares(before: dict[str, Calls] | None, after: dict[str, Calls] | None) -> dict[str, Any] | None:
    """Per replica: calls answered OK and failed between two snapshots, and its share of the OK ones.
    A replica the resolver dropped during the run (its counters went with it) is left out."""
    if before is None or after is None:
        return None
    delta = {address: calls - before.get(address, Calls()) for address, calls in after.items()}
    total = sum(c.succeeded for c in delta.values())
    return {
        address: {
            "ok": c.succeeded,
            "failed": c.failed,
            "share": c.succeeded / total if total else 0.0,
        }
        for address, c in sorted(delta.items())
    }


class ReplicaMeter:
    """Per-replica counts of one run: ``start()`` before it, ``shares()`` after (see ``replica_shares``)."""

    def __init__(self, target: str) -> None:
        self.target = target
        self._before: dict[str, Calls] | None = None

    def start(self) -> None:
        self._before = subchannel_calls(self.target)

    def shares(self) -> dict[str, Any] | None:
        return replica_shares(self._before, subchannel_calls(self.target))


def format_replicas(rows: list[dict[str, Any]], label: Any) -> list[str]:
    """Markdown lines of the per-replica table (empty when no row was load-balanced); ``label(row)`` names a
    row's load as the main table does."""
    measured = [row for row in rows if "replicas" in row]
    if not measured:
        return []
    addresses = sorted({a for row in measured for a in (row["replicas"] or {})})
    if not addresses:
        return ["Per replica: unknown (this grpcio exposes no channelz counters).", ""]
    lines = [
        "Per replica: calls answered OK by each, and its share (gRPC round_robin with client-side health "
        "checking; counted by the client channel's channelz; the table above is all replicas together).",
        "",
        "| load | " + " | ".join(addresses) + " |",
        "|---|" + "---:|" * len(addresses),
    ]
    for row in measured:
        shares = row["replicas"]
        if shares is None:
            cells = ["—"] * len(addresses)
        else:
            cells = [
                f"{shares[a]['ok']} ({shares[a]['share']:.0%})" if a in shares else "—" for a in addresses
            ]
        lines.append(f"| {label(row)} | " + " | ".join(cells) + " |")
    if any(row["replicas"] is None for row in measured):
        lines += ["", "—: this grpcio exposes no channelz counters, so the split is unknown."]
    lines.append("")
    return lines
