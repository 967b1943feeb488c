"""The OpenAI-compatible HTTP API, in the gRPC server's process and event loop, through the same batcher.

aiohttp runs inside an event loop it is given (``AppRunner`` + ``TCPSite``), with no process model or signal
handling of its own, so one loop, one batcher and one shutdown serve gRPC and HTTP alike. Routes:
``POST /v1/completions``, ``POST /v1/chat/completions``, ``GET /v1/models``, ``GET /health`` (200 serving,
503 draining; no auth, like gRPC health) and ``GET /metrics`` (the server's Prometheus registry). With an
auth token every route but /health needs ``Authorization: Bearer <token>``.

Errors are OpenAI's JSON (``{"error": {"message", "type", "param", "code"}}``): 400 invalid, 401 auth, 404
unknown model or route, 429 overloaded, 503 draining, 504 past the ``X-Request-Timeout`` (seconds) the caller
set, 500 internal. A failure after a stream has started is sent as a last ``data: {"error": ...}`` event.
Each request is counted in ``sparseinfer_requests`` under ``method="HTTP <path>"`` with the gRPC status name
of its outcome, and logged once, like a gRPC call. See docs/openai.md.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import ssl
import time
import uuid
from collections.abc import Callable
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from sparseinfer.serving.batcher import Batcher
from sparseinfer.serving.chat_template import ChatTemplate, TemplateError
from sparseinfer.serving.config import MAX_REQUEST_ID
from sparseinfer.serving.metrics import ServerMetrics
from sparseinfer.serving.model_info import ModelDescription
from sparseinfer.serving.openai_schema import (
    FIELD_NAMES,
    Answer,
    ApiRequest,
    parse_chat,
    parse_completion,
)
from sparseinfer.serving.requests import Completion, ErrorKind, ServingError, TokenChunk, merge_chunks
from sparseinfer.serving.validation import RequestFields, build_request, spell_field

log = logging.getLogger("sparseinfer.serving.requests")

# ErrorKind → (HTTP status, OpenAI error type, the gRPC status name the metrics count).
_ERRORS = {
    ErrorKind.INVALID: (400, "invalid_request_error", "INVALID_ARGUMENT"),
    ErrorKind.OVERLOADED: (429, "rate_limit_error", "RESOURCE_EXHAUSTED"),
    ErrorKind.DEADLINE: (504, "timeout_error", "DEADLINE_EXCEEDED"),
    ErrorKind.CANCELLED: (499, "cancelled", "CANCELLED"),
    ErrorKind.INTERNAL: (500, "server_error", "INTERNAL"),
    ErrorKind.UNAVAILABLE: (503, "service_unavailable", "UNAVAILABLE"),
}
_MAX_BODY = 8 << 20  # bytes; the prompt's own limit (limits.max_prompt_bytes) is checked after parsing


class _HttpCall:
    """One HTTP request's outcome, counted and logged exactly once (like the servicer's ``_Call``)."""

    def __init__(self, metrics: ServerMetrics, path: str) -> None:
        self.metrics = metrics
        self.method = f"HTTP {path}"
        self.request_id = ""
        self.ended = False

    def end(self, code: str, message: str = "", **fields: Any) -> None:
        if self.ended:
            return
        self.ended = True
        self.metrics.request_done(self.method, code)
        extra: dict[str, Any] = {"request_id": self.request_id, "method": self.method, "code": code}
        if message:
            extra["error"] = message
        level = logging.ERROR if code == "INTERNAL" else logging.INFO
        log.log(level, "request finished" if code == "OK" else "request failed", extra={**extra, **fields})


def error_body(message: str, kind: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


class OpenAIApi:
    """The routes over ``batcher``; ``piece(id)`` is one token's text, ``encode(text, add_bos)`` the
    tokenizer's, ``chat_template`` the checkpoint's (None: chat is refused)."""

    def __init__(
        self,
        batcher: Batcher,
        metrics: ServerMetrics,
        description: ModelDescription,
        encode: Callable[..., list[int]],
        piece: Callable[[int], str],
        chat_template: ChatTemplate | None,
        auth_token: str | None = None,
    ) -> None:
        self.batcher = batcher
        self.metrics = metrics
        self.model_id = description.model_id
        self.max_context = description.max_context
        self.encode = encode
        self.piece = piece
        self.template = chat_template
        self._expected = f"Bearer {auth_token}".encode() if auth_token else None
        self.draining = False
        self.app = web.Application(client_max_size=_MAX_BODY, middlewares=[self._auth])
        self.app.add_routes(
            [
                web.post("/v1/completions", self.completions),
                web.post("/v1/chat/completions", self.chat_completions),
                web.get("/v1/models", self.models),
                web.get("/health", self.health),
                web.get("/metrics", self.prometheus),
            ]
        )

    # ---- plumbing ----
    @web.middleware
    async def _auth(self, request: web.Request, handler: Callable) -> web.StreamResponse:
        if self._expected is not None and request.path != "/health":
            given = request.headers.get("Authorization", "").encode()
            if not hmac.compare_digest(given, self._expected):
                self.metrics.request_done(f"HTTP {request.path}", "UNAUTHENTICATED")
                body = error_body(
                    "missing or invalid bearer token (header `Authorization: Bearer <token>`)",
                    "invalid_request_error",
                    code="invalid_api_key",
                )
                return web.json_response(body, status=401)
        try:
            return await handler(request)
        except web.HTTPException as e:  # aiohttp's own (404 route, 405 method, 413 body): OpenAI's shape
            if e.status < 400:
                raise
            body = error_body(e.reason, "invalid_request_error", code=str(e.status))
            return web.json_response(body, status=e.status)

    def _refuse(self, call: _HttpCall, err: ServingError, names: dict[str, str]) -> web.Response:
        status, kind, code = _ERRORS[err.kind]
        param = None
        message = err.message
        if err.field is not None:
            param = spell_field(err.field, {**FIELD_NAMES, **names})
            message = f"{param}: {err.detail}" if err.detail is not None else err.message
        call.end(code, message)
        return web.json_response(error_body(message, kind, param), status=status)

    def _deadline(self, request: web.Request) -> float | None:
        text = request.headers.get("X-Request-Timeout")
        if text is None:
            return None
        try:
            seconds = float(text)
        except ValueError:
            seconds = -1.0
        if not seconds > 0:
            raise ServingError.invalid(
                "x-request-timeout", f"must be a positive number of seconds, got {text!r}"
            )
        return time.monotonic() + seconds

    def _request_id(self, request: web.Request) -> str:
        rid = request.headers.get("X-Request-Id", "")
        if len(rid) > MAX_REQUEST_ID:
            raise ServingError.invalid("request_id", f"at most {MAX_REQUEST_ID} characters, got {len(rid)}")
        return rid or uuid.uuid4().hex

    async def _body(self, request: web.Request) -> Any:
        try:
            return await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ServingError.invalid("body", f"is not valid JSON ({e})") from None

    # ---- routes ----
    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, chat=False)

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, chat=True)

    async def _generate(self, request: web.Request, chat: bool) -> web.StreamResponse:
        call = _HttpCall(self.metrics, request.path)
        names: dict[str, str] = {"prompt": "messages"} if chat else {}
        ticket = None
        try:
            try:
                call.request_id = self._request_id(request)
                deadline = self._deadline(request)
                body = await self._body(request)
                api = (parse_chat if chat else parse_completion)(body, call.request_id)
                names["max_new_tokens"] = api.max_tokens_name
                if api.model != self.model_id:
                    call.end("NOT_FOUND", f"model {api.model!r}")
                    message = (
                        f"The model {api.model!r} is not served here; GET /v1/models lists {self.model_id!r}."
                    )
                    return web.json_response(
                        error_body(message, "invalid_request_error", "model", "model_not_found"), status=404
                    )
                fields = await self._chat_prompt(api) if chat else api.fields
                ticket = await self.batcher.submit(build_request(fields, self.batcher.limits, deadline))
            except ServingError as e:
                return self._refuse(call, e, names)
            answer = Answer(chat, call.request_id, self.model_id, self.piece)
            if api.stream:
                return await self._stream(request, call, ticket, answer, api)
            return await self._unary(call, ticket, answer, names)
        finally:
            if ticket is not None:
                ticket.cancel()  # no-op when it completed; frees the slot when the client went away
            if not call.ended:
                call.end("CANCELLED", "the client closed the connection")

    async def _chat_prompt(self, api: ApiRequest) -> RequestFields:
        """The chat template applied to the messages, encoded as transformers does (no special tokens added:
        the template writes them); on a worker thread, off the event loop."""
        if self.template is None:
            raise ServingError.invalid(
                "messages", "this model has no chat template (tokenizer_config.json); use /v1/completions"
            )
        assert api.messages is not None
        messages = [dict(m) for m in api.messages]
        try:
            text = self.template.render(messages, add_generation_prompt=True)
        except TemplateError as e:
            raise ServingError.invalid("messages", str(e)) from None
        size = len(text.encode("utf-8"))
        if size > self.batcher.max_prompt_bytes:
            raise ServingError.invalid(
                "messages", f"render to {size} bytes, the limit is {self.batcher.max_prompt_bytes}"
            )
        ids = await asyncio.get_running_loop().run_in_executor(None, lambda: self.encode(text, add_bos=False))
        if not ids:
            raise ServingError.invalid("messages", "render to an empty prompt")
        fields = api.fields
        return RequestFields(**{**fields.__dict__, "prompt": tuple(ids)})

    async def _unary(
        self, call: _HttpCall, ticket: Any, answer: Answer, names: dict[str, str]
    ) -> web.Response:
        chunks: list[TokenChunk] = []
        try:
            async for item in ticket:
                if isinstance(item, TokenChunk):
                    chunks.append(item)
                    continue
                if item.last is not None:
                    chunks.append(item.last)
                merged = merge_chunks(chunks)
                self._finished(call, item)
                return web.json_response(answer.whole(merged.text, answer.logprobs(merged), item))
        except ServingError as e:
            return self._refuse(call, e, names)
        raise AssertionError("a ticket ended without a final item")  # pragma: no cover

    async def _stream(
        self, request: web.Request, call: _HttpCall, ticket: Any, answer: Answer, api: ApiRequest
    ) -> web.StreamResponse:
        response = web.StreamResponse(
            headers={
                "Content-Type": "text/event-stream",
                "Cache-Control": "no-cache",
                "X-Request-Id": call.request_id,
            }
        )
        await response.prepare(request)

        async def send(obj: Any) -> None:
            await response.write(b"data: " + json.dumps(obj).encode() + b"\n\n")

        first = answer.first()
        if first is not None:
            await send(first)
        try:
            async for item in ticket:
                if isinstance(item, TokenChunk):
                    await send(answer.chunk(item, api.include_usage))
                    continue
                for obj in answer.final(item, api.include_usage):
                    await send(obj)
                self._finished(call, item)
        except ServingError as e:
            status, kind, code = _ERRORS[e.kind]
            call.end(code, e.message)
            await send(error_body(e.message, kind, code=str(status)))
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response

    def _finished(self, call: _HttpCall, c: Completion) -> None:
        call.end(
            "OK",
            finish_reason=c.finish_reason,
            prompt_tokens=c.prompt_tokens,
            generated_tokens=c.completion_tokens,
            ttft_s=round(c.timings.ttft_s, 6),
            total_s=round(c.timings.total_s, 6),
            sparsity_mode=c.sparsity.mode,
            computed_share=round(c.sparsity.computed_share, 6),
        )

    async def models(self, request: web.Request) -> web.Response:
        self.metrics.request_done("HTTP /v1/models", "OK")
        model = {"id": self.model_id, "object": "model", "created": 0, "owned_by": "sparseinfer"}
        return web.json_response({"object": "list", "data": [{**model, "max_model_len": self.max_context}]})

    async def health(self, request: web.Request) -> web.Response:
        if self.draining:
            return web.json_response({"status": "draining"}, status=503)
        return web.json_response({"status": "serving"})

    async def prometheus(self, request: web.Request) -> web.Response:
        body = generate_latest(self.metrics.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


class HttpSite:
    """The API bound to ``host:port`` on the running loop (``port`` 0 picks one: ``self.port``)."""

    def __init__(self, api: OpenAIApi) -> None:
        self.api = api
        # handler_cancellation: a client that disconnects cancels its handler, whose `finally` cancels the
        # ticket, so the engine drops the request at its next step instead of generating for nobody.
        self.runner = web.AppRunner(api.app, handler_cancellation=True, access_log=None)
        self.port = 0

    async def start(self, host: str, port: int, ssl_context: ssl.SSLContext | None = None) -> int:
        await self.runner.setup()
        site = web.TCPSite(self.runner, host, port, ssl_context=ssl_context, reuse_port=False)
        await site.start()
        self.port = self.runner.addresses[0][1]
        return self.port

    async def stop(self) -> None:
        await self.runner.cleanup()
