"""The synchronous client.

    with Client("127.0.0.1:50051") as client:
        result = client.generate("The capital of France is", max_new_tokens=16, temperature=0)
        print(result.text, result.sparsity.computed_share)
        for chunk in client.generate_stream("Once upon a time", max_new_tokens=32):
            print(chunk.text, end="", flush=True)

Every method takes ``timeout`` (seconds for the whole call, retries included; default: the client's
``timeout``). Failures raise a ``SparseInferError`` subclass (see ``errors.py``). UNAVAILABLE is retried with
exponential backoff (``RetryPolicy``) while no response message has arrived; nothing else is retried. With
several replicas a retry is a new pick of gRPC's round_robin, which moves on with every pick and skips the
replicas that health checking marks NOT_SERVING, so a refused call goes to another replica:

    with Client(["10.0.0.1:50051", "10.0.0.2:50051"]) as client: ...
    with Client("dns:///sparseinfer.default.svc.cluster.local:50051") as client: ...
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import grpc

from sparseinfer_client import _channel
from sparseinfer_client._channel import RetryPolicy
from sparseinfer_client._convert import (
    GenerateOptions,
    build_generate_request,
    build_stream_request,
    chunk_from_pb,
    model_info_from_pb,
    result_from_pb,
    tokenize_from_pb,
)
from sparseinfer_client._proto import sparseinfer_pb2 as pb
from sparseinfer_client._proto import sparseinfer_pb2_grpc as pb_grpc
from sparseinfer_client._targets import channel_target
from sparseinfer_client.errors import DeadlineExceeded, Unavailable, from_rpc_error
from sparseinfer_client.types import GenerateResult, HealthStatus, ModelInfo, StreamChunk, TokenizeResult

_R = TypeVar("_R")


class _Deadline:
    """Remaining time of a call that may span several attempts."""

    def __init__(self, timeout: float | None) -> None:
        _channel.check_timeout(timeout)
        self.end = None if timeout is None else time.monotonic() + timeout

    def remaining(self) -> float | None:
        return None if self.end is None else max(self.end - time.monotonic(), 0.0)

    def allows_wait(self, seconds: float) -> bool:
        return self.end is None or time.monotonic() + seconds < self.end


def _retry_delay(
    error: grpc.RpcError, attempt: int, policy: RetryPolicy, deadline: _Deadline
) -> float | None:
    """Seconds to sleep before the next attempt, or None when ``error`` must be raised."""
    if error.code() != grpc.StatusCode.UNAVAILABLE or attempt >= policy.max_attempts:
        return None
    delay = policy.backoff(attempt)
    return delay if deadline.allows_wait(delay) else None


class Client:
    """Blocking client of one server or of several replicas. Thread-safe; one gRPC channel shared by all
    calls (one HTTP/2 connection per replica).

    ``target`` is "host:port", any gRPC target ("dns:///name:port", "unix:path", ...), or several "ip:port"
    (a sequence, or one comma-separated string). Several addresses or a ``dns:`` name are spread with gRPC's
    ``round_robin`` policy and client-side health checking, which skips replicas that report NOT_SERVING
    (draining); ``load_balancing`` True/False forces that on or off (see ``_targets.py``).

    ``token`` sends ``authorization: Bearer <token>`` on every call. TLS is used when ``tls`` is true or
    ``root_certificates`` (PEM bytes or a file path; None = system roots) is given; ``server_name`` overrides
    the name checked against the server's certificate (of every replica: they share one channel's TLS).
    """

    def __init__(
        self,
        target: str | Sequence[str] = _channel.DEFAULT_TARGET,
        *,
        token: str | None = None,
        tls: bool = False,
        root_certificates: bytes | str | Path | None = None,
        server_name: str | None = None,
        timeout: float | None = None,
        retry: RetryPolicy | None = None,
        max_message_bytes: int = _channel.DEFAULT_MAX_MESSAGE_BYTES,
        keepalive_s: float | None = None,
        load_balancing: bool | None = None,
    ) -> None:
        _channel.check_timeout(timeout)
        chosen = channel_target(target, load_balancing)
        self.target = chosen.target  # as gRPC sees it: several addresses become one ipv4:/ipv6: list
        self.load_balanced = chosen.balanced
        self.timeout = timeout
        self.retry = retry if retry is not None else RetryPolicy()
        self._metadata = _channel.auth_metadata(token)
        creds, extra = _channel.credentials(tls, root_certificates, server_name)
        options = _channel.channel_options(max_message_bytes, keepalive_s) + extra + chosen.options()
        if creds is None:
            self._channel = grpc.insecure_channel(self.target, options=options)
        else:
            self._channel = grpc.secure_channel(self.target, creds, options=options)
        self._stub = pb_grpc.SparseInferStub(self._channel)
        self._health = self._channel.unary_unary(
            _channel.HEALTH_CHECK,
            request_serializer=_channel.HealthCheckRequest.SerializeToString,
            response_deserializer=_channel.HealthCheckResponse.FromString,
        )

    # -- lifecycle -------------------------------------------------------------------------------------
    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def wait_ready(self, timeout: float = 10.0) -> None:
        """Block until the channel connects; raise ``Unavailable`` after ``timeout`` seconds."""
        try:
            grpc.channel_ready_future(self._channel).result(timeout=timeout)
        except grpc.FutureTimeoutError:
            raise Unavailable(f"no server reachable at {self.target} within {timeout} s") from None

    # -- calls -----------------------------------------------------------------------------------------
    def generate(
        self, prompt: str | Sequence[int], *, timeout: float | None = None, **options: Any
    ) -> GenerateResult:
        """Generate a completion. ``prompt`` is text or token ids; ``options`` are the fields of
        ``GenerateOptions`` (max_new_tokens, temperature, top_k, top_p, repetition_penalty, seed, stop,
        ignore_eos, sparsity_mode, request_id, return_tokens, return_logprobs)."""
        request = build_generate_request(prompt, GenerateOptions(**options))
        return result_from_pb(self._unary(self._stub.Generate, request, timeout))

    def generate_stream(
        self,
        prompt: str | Sequence[int],
        *,
        timeout: float | None = None,
        stream_interval: int = 1,
        **options: Any,
    ) -> Iterator[StreamChunk]:
        """Stream a completion chunk by chunk; the last chunk has ``finish_reason`` and the report.
        ``stream_interval`` N > 1: the first token comes at once, then N tokens per chunk (fewer messages,
        less CPU per token on server and client; the same tokens). Stopping the iteration early
        (``break``, or closing the iterator) cancels the call on the server."""
        request = build_stream_request(prompt, GenerateOptions(**options), stream_interval)
        return self._stream(request, self._timeout(timeout))

    def tokenize(self, text: str, *, timeout: float | None = None) -> TokenizeResult:
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        return tokenize_from_pb(self._unary(self._stub.Tokenize, pb.TokenizeRequest(text=text), timeout))

    def model_info(self, *, timeout: float | None = None) -> ModelInfo:
        return model_info_from_pb(self._unary(self._stub.ModelInfo, pb.ModelInfoRequest(), timeout))

    def health(self, service: str = "", *, timeout: float | None = None) -> HealthStatus:
        """grpc.health.v1 status of ``service`` ("": the whole server; or "sparseinfer.v1.SparseInfer").
        Load-balanced, the call goes to one replica the channel considers healthy, like any other call: it
        answers SERVING, or raises ``Unavailable`` when no replica is."""
        response = self._unary(self._health, _channel.HealthCheckRequest(service=service), timeout)
        return _channel.HEALTH_STATUS[response.status]  # type: ignore[return-value]

    # -- plumbing --------------------------------------------------------------------------------------
    def _timeout(self, timeout: float | None) -> float | None:
        return timeout if timeout is not None else self.timeout

    def _unary(self, method: Callable[..., _R], request: Any, timeout: float | None) -> _R:
        deadline = _Deadline(self._timeout(timeout))
        attempt = 0
        while True:
            attempt += 1
            try:
                return method(request, timeout=deadline.remaining(), metadata=self._metadata)
            except grpc.RpcError as error:
                delay = _retry_delay(error, attempt, self.retry, deadline)
                if delay is None:
                    raise from_rpc_error(error) from None
            time.sleep(delay)

    def _stream(self, request: pb.GenerateRequest, timeout: float | None) -> Iterator[StreamChunk]:
        deadline = _Deadline(timeout)
        attempt = 0
        while True:
            attempt += 1
            remaining = deadline.remaining()
            if remaining == 0.0:
                raise DeadlineExceeded("deadline passed before the stream could be (re)started")
            call = self._stub.GenerateStream(request, timeout=remaining, metadata=self._metadata)
            received = False
            try:
                for message in call:
                    received = True
                    yield chunk_from_pb(message)
                return
            except grpc.RpcError as error:
                # Once a message arrived the server has done work for us; re-running could duplicate output.
                delay = None if received else _retry_delay(error, attempt, self.retry, deadline)
                if delay is None:
                    raise from_rpc_error(error) from None
            finally:
                call.cancel()  # no-op after completion; frees the server's batch slot if we stopped early
            time.sleep(delay)
