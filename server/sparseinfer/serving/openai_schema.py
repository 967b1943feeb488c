"""The OpenAI API's JSON at the edge: request bodies → ``RequestFields`` (``validation.build_request`` then
applies the rules every front end shares) and the batcher's results → response objects and stream chunks.

Supported: /v1/completions and /v1/chat/completions with ``max_tokens`` (chat also
``max_completion_tokens``), ``temperature``, ``top_p``, ``stop``, ``seed``, ``n`` = 1, ``stream`` and
``stream_options.include_usage``, and the sampled token's log-probability (completions ``logprobs: 0``,
chat ``logprobs: true``). Extensions beside them: ``top_k``, ``repetition_penalty``, ``ignore_eos`` and
``sparsity_mode`` (dense | oracle | predicted). Every response, and the last chunk of a stream, carries the
request's sparsity report as ``sparsity``. Anything we cannot honour (``n`` > 1, ``best_of``, ``echo``,
penalties other than 0, top alternatives' log-probabilities) is refused by name, never ignored.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any

from sparseinfer.engine.accounting import SparsityReport
from sparseinfer.model.step import MODES
from sparseinfer.serving.requests import Completion, ServingError, TokenChunk
from sparseinfer.serving.validation import RequestFields

# Domain field names (validation, the engine) → this API's JSON fields, for error messages.
FIELD_NAMES = {
    "max_new_tokens": "max_tokens",
    "request_id": "x-request-id",
}
FINISH_REASON = {"length": "length", "eos": "stop", "stop": "stop", "cancelled": "cancelled"}


@dataclass(frozen=True)
class ApiRequest:
    """One parsed request: the shared fields plus what only this API decides (how to answer)."""

    fields: RequestFields
    model: str
    stream: bool = False
    include_usage: bool = False
    messages: tuple[dict[str, Any], ...] | None = None  # chat only: rendered into ``fields.prompt`` later
    max_tokens_name: str = "max_tokens"  # the field the caller used (chat may say max_completion_tokens)


def invalid(field: str, detail: str) -> ServingError:
    return ServingError.invalid(field, detail)


def _take(body: dict[str, Any], name: str, kinds: tuple[type, ...], what: str) -> Any:
    """``body[name]`` when present and not null, checked against ``kinds`` (a bool is never a number)."""
    value = body.get(name)
    if value is None:
        return None
    if (isinstance(value, bool) and bool not in kinds) or not isinstance(value, kinds):
        raise invalid(name, f"must be {what}, got {type(value).__name__}")
    return value


def _number(body: dict[str, Any], name: str) -> float | None:
    value = _take(body, name, (int, float), "a number")
    return None if value is None else float(value)


def _integer(body: dict[str, Any], name: str) -> int | None:
    return _take(body, name, (int,), "an integer")


def _common(
    body: dict[str, Any], prompt: str | tuple[int, ...], request_id: str, max_name: str
) -> RequestFields:
    n = _integer(body, "n")
    if n is not None and n != 1:
        raise invalid("n", f"only 1 choice per request is supported, got {n}")
    for name in ("presence_penalty", "frequency_penalty"):
        value = _number(body, name)
        if value:
            raise invalid(name, "is not supported (use repetition_penalty); leave it unset or 0")
    stop = body.get("stop")
    if stop is None:
        stops: tuple[str, ...] = ()
    elif isinstance(stop, str):
        stops = (stop,)
    elif isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        stops = tuple(stop)
    else:
        raise invalid("stop", "must be a string or a list of strings")
    mode = _take(body, "sparsity_mode", (str,), "a string")
    if mode is not None and mode not in MODES:
        raise invalid("sparsity_mode", f"must be one of {', '.join(MODES)}, got {mode!r}")
    ignore_eos = _take(body, "ignore_eos", (bool,), "a boolean")
    return RequestFields(
        prompt=prompt,
        max_new_tokens=_integer(body, max_name),
        stop=stops,
        temperature=_number(body, "temperature"),
        top_k=_integer(body, "top_k"),
        top_p=_number(body, "top_p"),
        repetition_penalty=_number(body, "repetition_penalty"),
        seed=_integer(body, "seed"),
        ignore_eos=bool(ignore_eos),
        sparsity_mode=mode,
        request_id=request_id,
    )


def _stream_options(body: dict[str, Any], stream: bool) -> bool:
    options = body.get("stream_options")
    if options is None:
        return False
    if not isinstance(options, dict):
        raise invalid("stream_options", "must be an object")
    if not stream:
        raise invalid("stream_options", "is only allowed with stream: true")
    include = options.get("include_usage", False)
    if not isinstance(include, bool):
        raise invalid("stream_options.include_usage", "must be a boolean")
    return include


def _model(body: dict[str, Any]) -> str:
    model = _take(body, "model", (str,), "a string")
    if not model:
        raise invalid("model", "is required (GET /v1/models lists the served model)")
    return model


def parse_completion(body: Any, request_id: str) -> ApiRequest:
    """A /v1/completions body."""
    if not isinstance(body, dict):
        raise invalid("body", "must be a JSON object")
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, list):
        if not all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            raise invalid("prompt", "must be a string, a list of token ids, or a list of one of them")
        prompt = tuple(prompt)
    elif not isinstance(prompt, str):
        raise invalid("prompt", "must be a string, a list of token ids, or a list of one of them")
    for name in ("echo",):
        if _take(body, name, (bool,), "a boolean"):
            raise invalid(name, "is not supported")
    best_of = _integer(body, "best_of")
    if best_of is not None and best_of != 1:
        raise invalid("best_of", f"only 1 is supported, got {best_of}")
    if _take(body, "suffix", (str,), "a string"):
        raise invalid("suffix", "is not supported")
    logprobs = _integer(body, "logprobs")
    if logprobs is not None and logprobs != 0:
        raise invalid(
            "logprobs", "only 0 is supported: the sampled token's log-probability, no top alternatives"
        )
    stream = bool(_take(body, "stream", (bool,), "a boolean"))
    fields = _common(body, prompt, request_id, "max_tokens")
    if logprobs is not None:
        fields = RequestFields(**{**asdict(fields), "logprobs": True})
    return ApiRequest(fields, _model(body), stream, _stream_options(body, stream))


_ROLES = ("system", "user", "assistant", "tool", "developer")


def _message(i: int, message: Any) -> dict[str, Any]:
    where = f"messages[{i}]"
    if not isinstance(message, dict):
        raise invalid(where, "must be an object with role and content")
    role = message.get("role")
    if role not in _ROLES:
        raise invalid(f"{where}.role", f"must be one of {', '.join(_ROLES)}, got {role!r}")
    content = message.get("content")
    if isinstance(content, list):  # content parts: only text parts carry anything we can read
        texts = []
        for j, part in enumerate(content):
            if (
                not isinstance(part, dict)
                or part.get("type") != "text"
                or not isinstance(part.get("text"), str)
            ):
                raise invalid(
                    f"{where}.content[{j}]", "only text parts ({type: text, text: ...}) are supported"
                )
            texts.append(part["text"])
        content = "".join(texts)
    if content is None and role == "assistant":
        content = ""
    if not isinstance(content, str):
        raise invalid(f"{where}.content", "must be a string or a list of text parts")
    return {**message, "content": content}


def parse_chat(body: Any, request_id: str) -> ApiRequest:
    """A /v1/chat/completions body; the messages are rendered into a prompt by the chat template."""
    if not isinstance(body, dict):
        raise invalid("body", "must be a JSON object")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise invalid("messages", "must be a non-empty list of messages")
    parsed = tuple(_message(i, m) for i, m in enumerate(messages))
    logprobs = _take(body, "logprobs", (bool,), "a boolean")
    top = _integer(body, "top_logprobs")
    if top:
        raise invalid(
            "top_logprobs", "is not supported: only the sampled token's log-probability is computed"
        )
    max_name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    stream = bool(_take(body, "stream", (bool,), "a boolean"))
    fields = _common(body, "", request_id, max_name)  # the prompt comes from the template
    if logprobs:
        fields = RequestFields(**{**asdict(fields), "logprobs": True})
    return ApiRequest(fields, _model(body), stream, _stream_options(body, stream), parsed, max_name)


# ---- responses ----
def sparsity_json(r: SparsityReport) -> dict[str, Any]:
    """The sparsity report as JSON, field for field as the gRPC ``SparsityReport`` (docs/openai.md)."""
    return {
        "mode": r.mode.value if hasattr(r.mode, "value") else r.mode,
        "tokens": r.tokens,
        "computed_share": r.computed_share,
        "hot_share": r.hot_share,
        "cold_share": r.cold_share,
        "ffn_bytes_read": r.ffn_bytes_read,
        "ffn_bytes_dense": r.ffn_bytes_dense,
        "layers": [
            {
                "predicted_active_share": layer.predicted_active_share,
                "true_active_share": layer.true_active_share,
                "recall": layer.recall,
            }
            for layer in r.layers
        ],
    }


def usage_json(c: Completion) -> dict[str, int]:
    return {
        "prompt_tokens": c.prompt_tokens,
        "completion_tokens": c.completion_tokens,
        "total_tokens": c.prompt_tokens + c.completion_tokens,
    }


class Answer:
    """Builds one request's response objects (unary) or chunks (stream) in the shape its endpoint uses."""

    def __init__(self, chat: bool, request_id: str, model: str, piece: Any) -> None:
        self.chat = chat
        self.id = ("chatcmpl-" if chat else "cmpl-") + request_id
        self.model = model
        self.created = int(time.time())
        self.piece = piece  # token id -> its text
        self._offset = 0  # completions logprobs: text offset of the next token

    def _envelope(self, obj: str, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": obj,
            "created": self.created,
            "model": self.model,
            "choices": choices,
        }

    def logprobs(self, chunk: TokenChunk | None) -> dict[str, Any] | None:
        if chunk is None or not chunk.logprobs:
            return None
        pieces = [self.piece(t) for t in chunk.token_ids]
        if self.chat:
            return {
                "content": [
                    {"token": p, "logprob": lp, "bytes": list(p.encode("utf-8")), "top_logprobs": []}
                    for p, lp in zip(pieces, chunk.logprobs, strict=True)
                ]
            }
        offsets = []
        for p in pieces:
            offsets.append(self._offset)
            self._offset += len(p)
        return {
            "tokens": pieces,
            "token_logprobs": list(chunk.logprobs),
            "top_logprobs": None,
            "text_offset": offsets,
        }

    def _choice(self, text: str, finish: str | None, logprobs: dict[str, Any] | None, delta: bool) -> dict:
        choice: dict[str, Any] = {"index": 0, "finish_reason": finish, "logprobs": logprobs}
        if not self.chat:
            choice["text"] = text
        elif delta:
            choice["delta"] = {"content": text} if text or finish is None else {}
        else:
            choice["message"] = {"role": "assistant", "content": text}
        return choice

    def whole(self, text: str, logprobs: dict[str, Any] | None, c: Completion) -> dict[str, Any]:
        """The unary response."""
        choice = self._choice(text, FINISH_REASON[c.finish_reason], logprobs, delta=False)
        out = self._envelope("chat.completion" if self.chat else "text_completion", [choice])
        return {**out, "usage": usage_json(c), "sparsity": sparsity_json(c.sparsity)}

    def _chunk_object(self) -> str:
        return "chat.completion.chunk" if self.chat else "text_completion"

    def first(self) -> dict[str, Any] | None:
        """Chat streams open with the assistant's role, as OpenAI's do."""
        if not self.chat:
            return None
        choice = {
            "index": 0,
            "delta": {"role": "assistant", "content": ""},
            "finish_reason": None,
            "logprobs": None,
        }
        return self._envelope(self._chunk_object(), [choice])

    def chunk(self, chunk: TokenChunk, include_usage: bool) -> dict[str, Any]:
        out = self._envelope(
            self._chunk_object(), [self._choice(chunk.text, None, self.logprobs(chunk), True)]
        )
        return {**out, "usage": None} if include_usage else out

    def final(self, c: Completion, include_usage: bool) -> list[dict[str, Any]]:
        """The stream's last chunk(s): the finish reason (with the sparsity report), then usage if asked."""
        last = c.last
        choice = self._choice(
            last.text if last else "", FINISH_REASON[c.finish_reason], self.logprobs(last), True
        )
        end = {**self._envelope(self._chunk_object(), [choice]), "sparsity": sparsity_json(c.sparsity)}
        if not include_usage:
            return [end]
        usage = {
            **self._envelope(self._chunk_object(), []),
            "usage": usage_json(c),
            "sparsity": end["sparsity"],
        }
        return [{**end, "usage": None}, usage]
