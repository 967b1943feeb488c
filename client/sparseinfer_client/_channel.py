"""What the sync and async clients share: channel options, credentials, auth metadata, the retry policy,
and the grpc.health.v1 messages (built in a private descriptor pool so the client needs no
grpcio-health-checking and never clashes with a copy of health.proto the server process registers)."""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

DEFAULT_TARGET = "127.0.0.1:50051"
SERVICE = "sparseinfer.v1.SparseInfer"
# Responses carry per-token details and per-layer reports; allow more than gRPC's 4 MiB default receive size.
DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff for UNAVAILABLE, and only for calls that have received no response message yet
    (a request that may have produced output is never silently re-run). ``max_attempts`` counts the first
    try; the delay before retry k (k = 1, 2, ...) is
    ``min(max_backoff_s, initial_backoff_s·multiplier^(k-1))``, scaled by a random factor in
    [1 - jitter, 1] so that many clients do not retry in lockstep."""

    max_attempts: int = 4
    initial_backoff_s: float = 0.1
    max_backoff_s: float = 2.0
    multiplier: float = 2.0
    jitter: float = 0.2

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts must be ≥ 1, got {self.max_attempts}")
        if self.initial_backoff_s < 0 or self.max_backoff_s < 0 or self.multiplier < 1:
            raise ValueError("backoff times must be ≥ 0 and multiplier ≥ 1")
        if not 0.0 <= self.jitter <= 1.0:
            raise ValueError(f"jitter must be in [0, 1], got {self.jitter}")

    def backoff(self, retry: int) -> float:
        """Seconds to wait before retry number ``retry`` (1-based)."""
        base = min(self.max_backoff_s, self.initial_backoff_s * self.multiplier ** (retry - 1))
        return base * (1.0 - self.jitter * random.random())


NO_RETRY = RetryPolicy(max_attempts=1)


def channel_options(max_message_bytes: int, keepalive_s: float | None) -> list[tuple[str, Any]]:
    options: list[tuple[str, Any]] = [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
        # We retry ourselves (with the only-before-a-response rule); keep gRPC's transparent retries off.
        ("grpc.enable_retries", 0),
    ]
    if keepalive_s is not None:
        # Pings only during calls: a long generation that is silent (prefill of a long prompt) keeps its
        # connection, while idle channels do not ping servers that would answer with GOAWAY.
        options += [
            ("grpc.keepalive_time_ms", int(keepalive_s * 1000)),
            ("grpc.keepalive_timeout_ms", 20_000),
            ("grpc.keepalive_permit_without_calls", 0),
        ]
    return options


def credentials(
    tls: bool, root_certificates: bytes | str | Path | None, server_name: str | None
) -> tuple[grpc.ChannelCredentials | None, list[tuple[str, Any]]]:
    """(channel credentials or None for plaintext, extra channel options)."""
    if not tls and root_certificates is None:
        return None, []
    roots = root_certificates
    if isinstance(roots, (str, Path)):
        roots = Path(roots).read_bytes()
    extra = [("grpc.ssl_target_name_override", server_name)] if server_name else []
    return grpc.ssl_channel_credentials(root_certificates=roots), extra


def auth_metadata(token: str | None) -> tuple[tuple[str, str], ...]:
    if token is None:
        return ()
    if not token or any(c in token for c in "\r\n"):
        raise ValueError("auth token must be a non-empty single-line string")
    return (("authorization", f"Bearer {token}"),)


def check_timeout(timeout: float | None) -> None:
    if timeout is not None and not timeout > 0:
        raise ValueError(f"timeout must be > 0 seconds or None, got {timeout}")


def _health_messages() -> tuple[Any, Any]:
    # grpc/health/v1/health.proto: HealthCheckRequest {string service = 1;}
    # HealthCheckResponse {ServingStatus status = 1;}
    # with UNKNOWN=0, SERVING=1, NOT_SERVING=2, SERVICE_UNKNOWN=3.
    T = descriptor_pb2.FieldDescriptorProto
    file = descriptor_pb2.FileDescriptorProto(name="grpc/health/v1/health.proto", package="grpc.health.v1")
    request = file.message_type.add(name="HealthCheckRequest")
    request.field.add(name="service", number=1, type=T.TYPE_STRING, label=T.LABEL_OPTIONAL)
    response = file.message_type.add(name="HealthCheckResponse")
    status = response.enum_type.add(name="ServingStatus")
    for number, name in enumerate(("UNKNOWN", "SERVING", "NOT_SERVING", "SERVICE_UNKNOWN")):
        status.value.add(name=name, number=number)
    response.field.add(
        name="status",
        number=1,
        type=T.TYPE_ENUM,
        label=T.LABEL_OPTIONAL,
        type_name=".grpc.health.v1.HealthCheckResponse.ServingStatus",
    )
    pool = descriptor_pool.DescriptorPool()
    pool.Add(file)
    get = message_factory.GetMessageClass
    return (
        get(pool.FindMessageTypeByName("grpc.health.v1.HealthCheckRequest")),
        get(pool.FindMessageTypeByName("grpc.health.v1.HealthCheckResponse")),
    )


HealthCheckRequest, HealthCheckResponse = _health_messages()
HEALTH_CHECK = "/grpc.health.v1.Health/Check"
HEALTH_STATUS = ("UNKNOWN", "SERVING", "NOT_SERVING", "SERVICE_UNKNOWN")
