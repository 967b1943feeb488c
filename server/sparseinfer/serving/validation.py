"""The request rules every front end shares: one function turns a request's plain fields into the batcher's
``BatchRequest`` or raises ``ServingError`` naming the field by its domain name (``max_new_tokens``,
``stop[2]``, ...). Each edge spells those names its own way: the gRPC servicer as .proto paths
(``convert.field_path``), the OpenAI HTTP API as its JSON fields (``openai_api``).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass

from sparseinfer.engine.errors import InvalidRequest
from sparseinfer.engine.sampling import SamplingParams
from sparseinfer.serving.config import MAX_REQUEST_ID, Limits
from sparseinfer.serving.requests import BatchRequest, ServingError


@dataclass(frozen=True)
class RequestFields:
    """A generation request as a front end received it; None: the caller left the field unset."""

    prompt: str | tuple[int, ...]
    max_new_tokens: int | None = None
    stop: tuple[str, ...] = ()
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float | None = None
    seed: int | None = None
    ignore_eos: bool = False
    logprobs: bool = False
    sparsity_mode: str | None = None  # a SparsityMode value; None: the server's default
    request_id: str = ""  # empty: the server assigns one
    stream_interval: int = 1


def spell_field(name: str, names: dict[str, str]) -> str:
    """A domain field name (``stop[2]`` included) as a front end spells it: ``names`` maps the base name."""
    base, bracket, index = name.partition("[")
    return names.get(base, base) + bracket + index


def build_request(fields: RequestFields, limits: Limits, deadline: float | None) -> BatchRequest:
    """Validate ``fields`` against ``limits`` and the engine's sampling rules; the batcher's request."""
    f = fields
    if not f.prompt:
        raise ServingError.invalid("prompt", "must not be empty")
    max_new = f.max_new_tokens
    if max_new is None:
        max_new = min(limits.default_max_new_tokens, limits.max_new_tokens)
    if not 0 < max_new <= limits.max_new_tokens:
        raise ServingError.invalid(
            "max_new_tokens", f"must be in [1, {limits.max_new_tokens}], got {max_new}"
        )
    if len(f.stop) > limits.max_stop_sequences:
        raise ServingError.invalid("stop", f"at most {limits.max_stop_sequences} allowed, got {len(f.stop)}")
    for i, stop in enumerate(f.stop):
        if not stop or len(stop) > limits.max_stop_length:
            raise ServingError.invalid(
                f"stop[{i}]", f"must be 1 to {limits.max_stop_length} characters, got {len(stop)}"
            )
    if len(f.request_id) > MAX_REQUEST_ID:
        raise ServingError.invalid(
            "request_id", f"at most {MAX_REQUEST_ID} characters, got {len(f.request_id)}"
        )
    params = SamplingParams(
        max_new_tokens=max_new,
        temperature=1.0 if f.temperature is None else f.temperature,
        top_k=0 if f.top_k is None else f.top_k,
        top_p=1.0 if f.top_p is None else f.top_p,
        repetition_penalty=1.0 if f.repetition_penalty is None else f.repetition_penalty,
        seed=f.seed,
        stop=f.stop,
        ignore_eos=f.ignore_eos,
        logprobs=f.logprobs,
    )
    try:
        params.validate()  # the engine's rules, the one place they live
    except InvalidRequest as e:
        raise ServingError.invalid(e.field, e.detail) from None
    return BatchRequest(
        f.prompt,
        params,
        f.request_id or uuid.uuid4().hex,
        f.sparsity_mode,
        deadline,
        stream_interval=max(1, f.stream_interval),
        default_max_new_tokens=f.max_new_tokens is None,
    )
