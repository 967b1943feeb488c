"""The ``sparseinfer.v1.SparseInfer`` service: wire messages in, batcher tickets, wire messages out.

Every RPC parses its own request bytes (``add_to_server`` registers the methods without a deserializer), so
a message that does not parse, or carries invalid UTF-8 in a string field, answers INVALID_ARGUMENT with a
plain message instead of gRPC's UNKNOWN. It converts at the edge (``convert``), maps ``ServingError`` kinds
to gRPC status codes and ends through one ``_Call``, which counts the outcome in the metrics and writes
the request's one structured log line exactly once, whatever ended it: a result, an error, the client's
cancel or deadline, or a broken stream. A call that ends early cancels its ticket, so the engine drops the
request before its next step.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import grpc
from google.protobuf.message import DecodeError
from google.protobuf.message import Message as PbMessage

from sparseinfer._proto import sparseinfer_pb2 as pb
from sparseinfer.serving.batcher import Batcher
from sparseinfer.serving.convert import (
    Details,
    error_message,
    final_fields,
    from_pb,
    model_info_to_pb,
    tokens_to_pb,
)
from sparseinfer.serving.delivery import Ticket
from sparseinfer.serving.metrics import ServerMetrics
from sparseinfer.serving.model_info import ModelDescription
from sparseinfer.serving.requests import Completion, ErrorKind, ServingError, TokenChunk

log = logging.getLogger("sparseinfer.serving.requests")

STATUS = {
    ErrorKind.INVALID: grpc.StatusCode.INVALID_ARGUMENT,
    ErrorKind.OVERLOADED: grpc.StatusCode.RESOURCE_EXHAUSTED,
    ErrorKind.DEADLINE: grpc.StatusCode.DEADLINE_EXCEEDED,
    ErrorKind.CANCELLED: grpc.StatusCode.CANCELLED,
    ErrorKind.INTERNAL: grpc.StatusCode.INTERNAL,
    ErrorKind.UNAVAILABLE: grpc.StatusCode.UNAVAILABLE,
}

M = TypeVar("M", bound=PbMessage)


class _Call:
    """The bookkeeping of one RPC: its outcome is counted and logged exactly once (``end``)."""

    def __init__(self, metrics: ServerMetrics, method: str, context: grpc.aio.ServicerContext) -> None:
        self.metrics = metrics
        self.method = method
        self.context = context
        self.request_id = ""
        self.ticket: Ticket | None = None
        self._ended = False

    def end(self, code: grpc.StatusCode, message: str = "", **fields: Any) -> None:
        if self._ended:
            return
        self._ended = True
        self.metrics.request_done(self.method, code.name)
        level = logging.ERROR if code is grpc.StatusCode.INTERNAL else logging.INFO
        text = "request finished" if code is grpc.StatusCode.OK else "request failed"
        extra: dict[str, Any] = {"request_id": self.request_id, "method": self.method, "code": code.name}
        if message:
            extra["error"] = message
        log.log(level, text, extra={**extra, **fields})

    async def abort(self, err: ServingError) -> None:
        code = STATUS[err.kind]
        message = error_message(err)
        self.end(code, message)
        await self.context.abort(code, message)

    def close(self) -> None:
        """Called in ``finally``: a call that ended without an outcome was ended by the client (its cancel,
        its deadline, or a broken stream); its ticket is cancelled so the engine drops the request."""
        if self.ticket is not None:
            self.ticket.cancel()
        if not self._ended:
            remaining = self.context.time_remaining()
            expired = remaining is not None and remaining <= 0
            code = grpc.StatusCode.DEADLINE_EXCEEDED if expired else grpc.StatusCode.CANCELLED
            self.end(code, "the call ended on the client's side")


class SparseInferServicer:
    """Serves Generate / GenerateStream through ``batcher``; Tokenize and ModelInfo directly.

    ``encode(text) -> ids`` and ``piece(id) -> str`` are the tokenizer's (thread-safe, no torch; they run on
    ``prepare``, a worker pool, never on the event loop); ``model_info`` is built once at start-up.
    """

    def __init__(
        self,
        batcher: Batcher,
        metrics: ServerMetrics,
        encode: Callable[[str], list[int]],
        piece: Callable[[int], str],
        model_info: ModelDescription,
    ) -> None:
        self.batcher = batcher
        self.metrics = metrics
        self.encode = encode
        self.piece = piece
        self.model_info = model_info_to_pb(model_info)  # static: converted once
        self._tokenize_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sparseinfer-tokenize")

    def close(self) -> None:
        self._tokenize_pool.shutdown(wait=False, cancel_futures=True)

    # ---- generation ----
    async def Generate(self, raw: bytes, context: grpc.aio.ServicerContext) -> pb.GenerateResponse:
        call = _Call(self.metrics, "Generate", context)
        try:
            ticket, details = await self._submit(call, raw, stream=False)
            text: list[str] = []
            tokens: list[pb.Token] = []
            try:
                async for item in ticket:
                    if isinstance(item, TokenChunk):
                        text.append(item.text)
                        if details.tokens:
                            tokens.extend(tokens_to_pb(item, self.piece))
                        continue
                    if item.last is not None:
                        text.append(item.last.text)
                        if details.tokens:
                            tokens.extend(tokens_to_pb(item.last, self.piece))
                    response = pb.GenerateResponse(
                        request_id=call.request_id,
                        text="".join(text),
                        tokens=tokens,
                        **final_fields(item),  # type: ignore[arg-type]
                    )
                    self._finished(call, item)
                    return response
            except ServingError as e:
                await call.abort(e)
            raise AssertionError("a ticket ended without a final item")  # pragma: no cover
        finally:
            call.close()

    async def GenerateStream(
        self, raw: bytes, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.GenerateStreamResponse]:
        call = _Call(self.metrics, "GenerateStream", context)
        try:  # `finally` runs on GeneratorExit too: a stream closed under us is still counted once
            ticket, details = await self._submit(call, raw, stream=True)
            rid = call.request_id
            try:
                async for item in ticket:
                    if isinstance(item, TokenChunk):
                        tokens = tokens_to_pb(item, self.piece) if details.tokens else []
                        yield pb.GenerateStreamResponse(request_id=rid, text=item.text, tokens=tokens)
                        continue
                    last = item.last
                    final = pb.GenerateStreamResponse(
                        request_id=rid,
                        text=last.text if last is not None else "",
                        tokens=tokens_to_pb(last, self.piece) if last is not None and details.tokens else [],
                        **final_fields(item),  # type: ignore[arg-type]
                    )
                    self._finished(call, item)
                    yield final
            except ServingError as e:
                await call.abort(e)
        finally:
            call.close()

    async def _submit(self, call: _Call, raw: bytes, stream: bool) -> tuple[Ticket, Details]:
        """Parse, validate and enqueue the request; ``stream`` False: a unary call (its tokens come back
        with the completion, see ``BatchRequest.stream``)."""
        request = await self._parse(call, raw, pb.GenerateRequest)
        call.request_id = request.request_id
        remaining = call.context.time_remaining()
        deadline = time.monotonic() + remaining if remaining is not None else None
        try:
            batch_request, details = from_pb(request, self.batcher.limits, deadline)
            batch_request = dataclasses.replace(batch_request, stream=stream)
            call.request_id = batch_request.request_id
            call.ticket = await self.batcher.submit(batch_request)
            return call.ticket, details
        except ServingError as e:
            await call.abort(e)
            raise  # unreachable: abort raises
        except asyncio.CancelledError:
            raise
        except Exception as e:  # a bug in validation or tokenization: this request fails, serving goes on
            log.exception("request could not be started", extra={"request_id": call.request_id})
            await call.abort(
                ServingError(ErrorKind.INTERNAL, f"the server failed to start this request: {e}")
            )
            raise

    async def _parse(self, call: _Call, raw: bytes, message: type[M]) -> M:
        """``raw`` as a ``message``, or INVALID_ARGUMENT (not UNKNOWN) naming what is wrong with it."""
        try:
            return message.FromString(raw)
        except DecodeError as e:
            why = str(e).rpartition(": ")[2] or "it does not parse"
            name = message.DESCRIPTOR.full_name
            await call.abort(ServingError.invalid("request", f"is not a valid {name} message ({why})"))
            raise  # unreachable: abort raises

    def _finished(self, call: _Call, c: Completion) -> None:
        r = c.sparsity
        call.end(
            grpc.StatusCode.OK,
            finish_reason=c.finish_reason,
            prompt_tokens=c.prompt_tokens,
            generated_tokens=c.completion_tokens,
            ttft_s=round(c.timings.ttft_s, 6),
            total_s=round(c.timings.total_s, 6),
            sparsity_mode=r.mode,
            computed_share=round(r.computed_share, 6),
        )

    # ---- the rest ----
    async def Tokenize(self, raw: bytes, context: grpc.aio.ServicerContext) -> pb.TokenizeResponse:
        call = _Call(self.metrics, "Tokenize", context)
        try:
            request = await self._parse(call, raw, pb.TokenizeRequest)
            size = len(request.text.encode("utf-8"))
            limit = self.batcher.max_prompt_bytes
            if size > limit:
                await call.abort(
                    ServingError.invalid(
                        "text", f"has {size} bytes, the limit is {limit} (limits.max_prompt_bytes)"
                    )
                )
            loop = asyncio.get_running_loop()
            response = await loop.run_in_executor(self._tokenize_pool, self._tokenize, request.text)
            call.end(grpc.StatusCode.OK, tokens=len(response.ids))
            return response
        finally:
            call.close()

    def _tokenize(self, text: str) -> pb.TokenizeResponse:
        ids = self.encode(text)
        return pb.TokenizeResponse(ids=ids, pieces=[self.piece(i) for i in ids])

    async def ModelInfo(self, raw: bytes, context: grpc.aio.ServicerContext) -> pb.ModelInfoResponse:
        call = _Call(self.metrics, "ModelInfo", context)
        try:
            await self._parse(call, raw, pb.ModelInfoRequest)
            call.end(grpc.StatusCode.OK)
            return self.model_info
        finally:
            call.close()


def add_to_server(servicer: SparseInferServicer, server: grpc.aio.Server) -> None:
    """Register ``servicer``'s methods under ``sparseinfer.v1.SparseInfer``, taking each request as raw
    bytes (no request deserializer: ``SparseInferServicer._parse`` answers a malformed message itself)."""
    s = servicer
    handlers = {
        "Generate": grpc.unary_unary_rpc_method_handler(
            s.Generate, response_serializer=pb.GenerateResponse.SerializeToString
        ),
        "GenerateStream": grpc.unary_stream_rpc_method_handler(
            s.GenerateStream, response_serializer=pb.GenerateStreamResponse.SerializeToString
        ),
        "Tokenize": grpc.unary_unary_rpc_method_handler(
            s.Tokenize, response_serializer=pb.TokenizeResponse.SerializeToString
        ),
        "ModelInfo": grpc.unary_unary_rpc_method_handler(
            s.ModelInfo, response_serializer=pb.ModelInfoResponse.SerializeToString
        ),
    }
    service = pb.DESCRIPTOR.services_by_name["SparseInfer"]
    assert set(handlers) == {m.name for m in service.methods}, "every rpc of the .proto has a handler"
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service.full_name, handlers),))
