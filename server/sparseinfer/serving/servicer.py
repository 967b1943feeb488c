"""The ``sparseinfer.v1.SparseInfer`` service: wire messages in, batcher tickets, wire messages out.

Every RPC converts at the edge (``convert``), maps ``ServingError`` kinds to gRPC status codes, counts the
outcome in the metrics and writes one structured log line per generation with its request id. A call that
ends early (client cancel, deadline, broken stream) cancels its ticket in ``finally``, so the engine drops the
request before its next step.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import AsyncIterator, Callable

import grpc

from sparseinfer.serving.batcher import Batcher, Ticket
from sparseinfer.serving.convert import Details, error_message, final_fields, from_pb, tokens_to_pb
from sparseinfer.serving.metrics import ServerMetrics
from sparseinfer.serving.requests import Completion, ErrorKind, ServingError, TokenChunk
from sparseinfer_client._proto import sparseinfer_pb2 as pb
from sparseinfer_client._proto import sparseinfer_pb2_grpc as pb_grpc

log = logging.getLogger("sparseinfer.serving.requests")

STATUS = {
    ErrorKind.INVALID: grpc.StatusCode.INVALID_ARGUMENT,
    ErrorKind.OVERLOADED: grpc.StatusCode.RESOURCE_EXHAUSTED,
    ErrorKind.DEADLINE: grpc.StatusCode.DEADLINE_EXCEEDED,
    ErrorKind.CANCELLED: grpc.StatusCode.CANCELLED,
    ErrorKind.INTERNAL: grpc.StatusCode.INTERNAL,
    ErrorKind.UNAVAILABLE: grpc.StatusCode.UNAVAILABLE,
}


class SparseInferServicer(pb_grpc.SparseInferServicer):
    """Serves Generate / GenerateStream through ``batcher``; Tokenize and ModelInfo directly.

    ``encode(text) -> ids`` and ``piece(id) -> str`` are the tokenizer's (thread-safe, no torch);
    ``model_info`` is built once at start-up (it does not change while serving).
    """

    def __init__(
        self,
        batcher: Batcher,
        metrics: ServerMetrics,
        encode: Callable[[str], list[int]],
        piece: Callable[[int], str],
        model_info: pb.ModelInfoResponse,
    ) -> None:
        self.batcher = batcher
        self.metrics = metrics
        self.encode = encode
        self.piece = piece
        self.model_info = model_info

    # ---- generation ----
    async def Generate(  # gRPC method names are CamelCase
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> pb.GenerateResponse:
        ticket, details = await self._submit("Generate", request, context, stream=False)
        text: list[str] = []
        tokens: list[pb.Token] = []
        try:
            async for item in ticket:
                if isinstance(item, TokenChunk):
                    text.append(item.text)
                    if details.tokens:
                        tokens.extend(tokens_to_pb(item, self.piece))
                else:
                    self._finished("Generate", ticket, item)
                    if item.last is not None:
                        text.append(item.last.text)
                        if details.tokens:
                            tokens.extend(tokens_to_pb(item.last, self.piece))
                    return pb.GenerateResponse(
                        request_id=ticket.request.request_id,
                        text="".join(text),
                        tokens=tokens,
                        **final_fields(item),  # type: ignore[arg-type]
                    )
        except ServingError as e:
            await self._abort("Generate", ticket.request.request_id, e, context)
        except asyncio.CancelledError:
            self._gone("Generate", ticket, context)
            raise
        finally:
            ticket.cancel()
        raise AssertionError("a ticket ended without a final item")  # pragma: no cover

    async def GenerateStream(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.GenerateStreamResponse]:
        ticket, details = await self._submit("GenerateStream", request, context, stream=True)
        rid = ticket.request.request_id
        try:
            async for item in ticket:
                if isinstance(item, TokenChunk):
                    tokens = tokens_to_pb(item, self.piece) if details.tokens else []
                    yield pb.GenerateStreamResponse(request_id=rid, text=item.text, tokens=tokens)
                else:
                    self._finished("GenerateStream", ticket, item)
                    last = item.last
                    yield pb.GenerateStreamResponse(
                        request_id=rid,
                        text=last.text if last is not None else "",
                        tokens=tokens_to_pb(last, self.piece) if last is not None and details.tokens else [],
                        **final_fields(item),  # type: ignore[arg-type]
                    )
        except ServingError as e:
            await self._abort("GenerateStream", rid, e, context)
        except asyncio.CancelledError:
            self._gone("GenerateStream", ticket, context)
            raise
        finally:
            ticket.cancel()

    async def _submit(
        self, method: str, request: pb.GenerateRequest, context: grpc.aio.ServicerContext, stream: bool
    ) -> tuple[Ticket, Details]:
        """Validate and enqueue ``request``; ``stream`` False: a unary call (its tokens come back with the
        completion, see ``BatchRequest.stream``)."""
        remaining = context.time_remaining()
        deadline = time.monotonic() + remaining if remaining is not None else None
        try:
            batch_request, details = from_pb(request, self.batcher.limits, deadline)
            batch_request = dataclasses.replace(batch_request, stream=stream)
            return self.batcher.submit(batch_request), details
        except ServingError as e:
            await self._abort(method, request.request_id, e, context)
            raise  # unreachable: abort raises
        except Exception as e:  # a bug in validation or tokenization: this request fails, serving goes on
            log.exception("request could not be started", extra={"request_id": request.request_id})
            err = ServingError(ErrorKind.INTERNAL, f"the server failed to start this request: {e}")
            await self._abort(method, request.request_id, err, context)
            raise

    async def _abort(
        self, method: str, request_id: str, err: ServingError, context: grpc.aio.ServicerContext
    ) -> None:
        code = STATUS[err.kind]
        self.metrics.request_done(method, code.name)
        message = error_message(err)
        level = logging.ERROR if err.kind is ErrorKind.INTERNAL else logging.INFO
        log.log(
            level, "request failed", extra={"request_id": request_id, "code": code.name, "error": message}
        )
        await context.abort(code, message)

    def _gone(self, method: str, ticket: Ticket, context: grpc.aio.ServicerContext) -> None:
        """The call ended under us: the client cancelled, or its deadline passed (gRPC cancelled us)."""
        remaining = context.time_remaining()
        code = "DEADLINE_EXCEEDED" if remaining is not None and remaining <= 0 else "CANCELLED"
        self.metrics.request_done(method, code)
        log.info("request ended by the client", extra={"request_id": ticket.request.request_id, "code": code})

    def _finished(self, method: str, ticket: Ticket, c: Completion) -> None:
        self.metrics.request_done(method, grpc.StatusCode.OK.name)
        r = c.sparsity
        log.info(
            "request finished",
            extra={
                "request_id": ticket.request.request_id,
                "code": "OK",
                "finish_reason": c.finish_reason,
                "prompt_tokens": c.prompt_tokens,
                "generated_tokens": c.completion_tokens,
                "ttft_s": round(c.timings.ttft_s, 6),
                "total_s": round(c.timings.total_s, 6),
                "sparsity_mode": r.mode,
                "computed_share": round(r.computed_share, 6),
            },
        )

    # ---- the rest ----
    async def Tokenize(
        self, request: pb.TokenizeRequest, context: grpc.aio.ServicerContext
    ) -> pb.TokenizeResponse:
        # Tokenizing a long text is CPU work: keep it off the event loop.
        ids = await asyncio.to_thread(self.encode, request.text) if request.text else self.encode("")
        self.metrics.request_done("Tokenize", "OK")
        return pb.TokenizeResponse(ids=ids, pieces=[self.piece(i) for i in ids])

    async def ModelInfo(
        self, request: pb.ModelInfoRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelInfoResponse:
        self.metrics.request_done("ModelInfo", "OK")
        return self.model_info
