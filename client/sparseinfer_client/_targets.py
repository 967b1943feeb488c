"""Several replicas behind one channel, balanced by gRPC itself.

A client given several addresses (or a ``dns:///`` name) gets one channel whose service config asks gRPC's
``round_robin`` policy to spread calls over every address the resolver returns, and gRPC's client-side health
checking (grpc.health.v1 ``Watch``, one stream per connection) to take a replica out of the rotation while
it reports NOT_SERVING: the server does that as soon as it starts draining on SIGTERM, while it finishes the
streams it already runs. No balancing happens in Python; the only work here is spelling the target.

gRPC Python has no resolver for a static list of host names; its ``ipv4:`` / ``ipv6:`` schemes take a
comma-separated list of address literals, so that is what a list of targets becomes. Names go through
``dns:///name:port``: every A/AAAA record is one replica (a headless Kubernetes Service gives exactly that).
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

# The name the server marks SERVING / NOT_SERVING (it sets "" too; the service's own name is the precise one).
HEALTH_SERVICE = "sparseinfer.v1.SparseInfer"
SERVICE_CONFIG: dict[str, Any] = {
    "loadBalancingConfig": [{"round_robin": {}}],
    "healthCheckConfig": {"serviceName": HEALTH_SERVICE},
}
# Schemes whose target can name several backends; a plain "host:port" resolves through DNS too, but balancing
# it is opt-in (``load_balancing=True``) so that one-server clients keep gRPC's default pick_first behaviour,
# under which ``health()`` still reaches a draining server and reports NOT_SERVING.
_MULTI_SCHEMES = ("dns:", "ipv4:", "ipv6:")


@dataclass(frozen=True)
class ChannelTarget:
    """What the channel is built from: gRPC's target string and whether the balancing config applies."""

    target: str
    balanced: bool

    def options(self) -> list[tuple[str, Any]]:
        if not self.balanced:
            return []
        return [
            ("grpc.service_config", json.dumps(SERVICE_CONFIG)),
            # A TXT record of the name must not swap our policy for another one behind the caller's back.
            ("grpc.service_config_disable_resolution", 1),
        ]


def channel_target(target: str | Sequence[str], load_balancing: bool | None = None) -> ChannelTarget:
    """Turn the client's ``target`` argument into a gRPC target.

    ``target``: one gRPC target ("host:port", "dns:///name:port", "ipv4:a:p,b:p", "unix:path", ...), a
    comma-separated list of "ip:port" in one string, or a sequence of them. ``load_balancing`` None means:
    round_robin with health checking for several addresses or a ``dns:`` / ``ipv4:`` / ``ipv6:`` target,
    gRPC's defaults for a single "host:port"; True or False forces it either way.
    """
    if isinstance(target, str):
        if "," in target and not target.startswith(_MULTI_SCHEMES):
            addresses = [part.strip() for part in target.split(",")]
        else:
            return _chosen(target.strip(), target.startswith(_MULTI_SCHEMES), load_balancing)
    elif isinstance(target, Sequence) and all(isinstance(t, str) for t in target):
        addresses = [t.strip() for t in target]
    else:
        raise TypeError(f"target must be a str or a sequence of str, got {type(target).__name__}")
    if not addresses:
        raise ValueError("target lists no address")
    if not all(addresses):
        raise ValueError(f"empty address in target {target!r}")
    if len(addresses) == 1:
        return channel_target(addresses[0], load_balancing)
    if len(set(addresses)) != len(addresses):
        raise ValueError(f"an address is listed twice in {addresses}")
    families = {_family(a) for a in addresses}
    if len(families) > 1:
        raise ValueError(
            "gRPC takes a static list of IPv4 or of IPv6 addresses, not both; put them behind a DNS name "
            "(dns:///name:port)"
        )
    return _chosen(f"{families.pop()}:{','.join(addresses)}", True, load_balancing)


def _chosen(target: str, several: bool, load_balancing: bool | None) -> ChannelTarget:
    if not target:
        raise ValueError("target must not be empty")
    return ChannelTarget(target, several if load_balancing is None else bool(load_balancing))


def _family(address: str) -> str:
    """ "ipv4" or "ipv6" for an "ip:port" / "[ip]:port" literal; ValueError otherwise."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"expected ip:port, got {address!r}")
    bracketed = host.startswith("[") and host.endswith("]")
    try:
        ip = ipaddress.ip_address(host[1:-1] if bracketed else host)
    except ValueError:
        raise ValueError(
            f"{address!r}: several targets must be IP addresses (gRPC has no static list of names); "
            "for host names use one dns:///name:port target that resolves to every replica"
        ) from None
    if ip.version == 6 and not bracketed:
        raise ValueError(f"write an IPv6 address in brackets: [{host}]:{port}")
    return f"ipv{ip.version}"
