"""The asyncio client: the same calls as ``Client``, awaitable, on a ``grpc.aio`` channel.

    async with AsyncClient("127.0.0.1:50051") as client:
        result = await client.generate("Hello", max_new_tokens=8)
        async for chunk in client.generate_stream("Hello", max_new_tokens=8):
            print(chunk.text, end="")

Create it inside the running event loop that uses it (grpc.aio channels belong to one loop).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import grpc
import grpc.aio

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
from sparseinfer_client.client import _Deadline, _retry_delay
from sparseinfer_client.errors import DeadlineExceeded, Unavailable, from_rpc_error
from sparseinfer_client.types import GenerateResult, HealthStatus, ModelInfo, StreamChunk, TokenizeResult


class AsyncClient:
    """Asyncio client of one server or of several replicas; arguments as for ``Client``."""

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
            self._channel = grpc.aio.insecure_channel(self.target, options=options)
        else:
            self._channel = grpc.aio.secure_channel(self.target, creds, options=options)
        self._stub = pb_grpc.SparseInferStub(self._channel)
        self._health = self._channel.unary_unary(
            _channel.HEALTH_CHECK,
            request_serializer=_channel.HealthCheckRequest.SerializeToString,
            response_deserializer=_channel.HealthCheckResponse.FromString,
        )

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def wait_ready(self, timeout: float = 10.0) -> None:
        """Wait until the channel connects; raise ``Unavailable`` after ``timeout`` seconds."""
        try:
            await asyncio.wait_for(self._channel.channel_ready(), timeout)
        except asyncio.TimeoutError:
            raise Unavailable(f"no server reachable at {self.target} within {timeout} s") from None

    async def generate(
        self, prompt: str | Sequence[int], *, timeout: float | None = None, **options: Any
    ) -> GenerateResult:
        """See ``Client.generate``."""
        request = build_generate_request(prompt, GenerateOptions(**options))
        return result_from_pb(await self._unary(self._stub.Generate, request, timeout))

    def generate_stream(
        self,
        prompt: str | Sequence[int],
        *,
        timeout: float | None = None,
        stream_interval: int = 1,
        **options: Any,
    ) -> AsyncIterator[StreamChunk]:
        """See ``Client.generate_stream``; leaving ``async for`` early (or ``aclose()``) cancels the call."""
        request = build_stream_request(prompt, GenerateOptions(**options), stream_interval)
        return self._stream(request, timeout if timeout is not None else self.timeout)

    async def tokenize(self, text: str, *, timeout: float | None = None) -> TokenizeResult:
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        return tokenize_from_pb(
            await self._unary(self._stub.Tokenize, pb.TokenizeRequest(text=text), timeout)
        )

    async def model_info(self, *, timeout: float | None = None) -> ModelInfo:
        return model_info_from_pb(await self._unary(self._stub.ModelInfo, pb.ModelInfoRequest(), timeout))

    async def health(self, service: str = "", *, timeout: float | None = None) -> HealthStatus:
        response = await self._unary(self._health, _channel.HealthCheckRequest(service=service), timeout)
        return _channel.HEALTH_STATUS[response.status]  # type: ignore[return-value]

    async def _unary(self, method: Any, request: Any, timeout: float | None) -> Any:
        deadline = _Deadline(timeout if timeout is not None else self.timeout)
        attempt = 0
        while True:
            attempt += 1
            try:
                return await method(request, timeout=deadline.remaining(), metadata=self._metadata)
            except grpc.RpcError as error:
                delay = _retry_delay(error, attempt, self.retry, deadline)
                if delay is None:
                    raise from_rpc_error(error) from None
            await asyncio.sleep(delay)

    async def _stream(self, request: pb.GenerateRequest, timeout: float | None) -> AsyncIterator[StreamChunk]:
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
                async for message in call:
                    received = True
                    yield chunk_from_pb(message)
                return
            except grpc.RpcError as error:
                delay = None if received else _retry_delay(error, attempt, self.retry, deadline)
                if delay is None:
                    raise from_rpc_error(error) from None
            finally:
                call.cancel()
            await asyncio.sleep(delay)
