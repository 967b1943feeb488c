"""Protobuf at the edge: build request messages from plain arguments, turn responses into dataclasses.

Nothing outside this module (and the call wrappers) touches generated protobuf classes, so users only ever
see the dataclasses of ``types.py``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any, TypeVar

from sparseinfer_client._proto import sparseinfer_pb2 as pb
from sparseinfer_client.errors import ValidationError
from sparseinfer_client.types import (
    SPARSITY_MODES,
    FinishReason,
    GenerateResult,
    LayerSparsity,
    Limits,
    ModelInfo,
    Placement,
    SparsityReport,
    StreamChunk,
    Timings,
    Token,
    TokenizeResult,
    Usage,
)

_UINT32_MAX = 2**32 - 1
_MODE_TO_PB = {
    "dense": pb.SPARSITY_MODE_DENSE,
    "oracle": pb.SPARSITY_MODE_ORACLE,
    "predicted": pb.SPARSITY_MODE_PREDICTED,
}
_MODE_FROM_PB = {v: k for k, v in _MODE_TO_PB.items()}
_FINISH_FROM_PB: dict[int, FinishReason] = {
    pb.FINISH_REASON_LENGTH: "length",
    pb.FINISH_REASON_EOS: "eos",
    pb.FINISH_REASON_STOP_SEQUENCE: "stop",
    pb.FINISH_REASON_CANCELLED: "cancelled",
    pb.FINISH_REASON_DEADLINE: "deadline",
}


@dataclass(frozen=True)
class GenerateOptions:
    """Everything of a Generate call except the prompt; None means "server default"."""

    max_new_tokens: int | None = None
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float | None = None
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    sparsity_mode: str | None = None
    request_id: str | None = None
    return_tokens: bool = False
    return_logprobs: bool = False


def build_generate_request(prompt: str | Sequence[int], options: GenerateOptions) -> pb.GenerateRequest:
    """Encode a request; raises ``ValidationError`` (code None: nothing was sent) for what protobuf cannot
    carry. Value ranges (temperature ≥ 0, ...) are the server's to check, so both clients and other callers
    get the same INVALID_ARGUMENT messages."""
    request = pb.GenerateRequest()
    if isinstance(prompt, str):
        request.text = prompt
    elif isinstance(prompt, Sequence) and all(isinstance(i, int) and not isinstance(i, bool) for i in prompt):
        if any(not 0 <= i <= _UINT32_MAX for i in prompt):
            raise ValidationError("prompt token ids must be integers in [0, 2**32)")
        request.token_ids.ids.extend(prompt)
        request.token_ids.SetInParent()  # an empty id list is still "token ids were given"
    else:
        raise ValidationError(
            f"prompt must be a str or a sequence of int token ids, got {type(prompt).__name__}"
        )

    sampling = request.sampling
    for name in ("temperature", "top_p", "repetition_penalty"):
        value = getattr(options, name)
        if value is not None:
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValidationError(f"sampling.{name} must be a number, got {value!r}")
            setattr(sampling, name, float(value))
    _set_int(sampling, "top_k", options.top_k, "sampling.top_k", -(2**31), 2**31 - 1)
    _set_int(sampling, "seed", options.seed, "sampling.seed", 0, 2**64 - 1)
    _set_int(
        request.stopping,
        "max_new_tokens",
        options.max_new_tokens,
        "stopping.max_new_tokens",
        -(2**31),
        2**31 - 1,
    )
    if isinstance(options.stop, str) or not all(isinstance(s, str) for s in options.stop):
        raise ValidationError(f"stopping.stop_sequences must be a sequence of strings, got {options.stop!r}")
    request.stopping.stop_sequences.extend(options.stop)
    request.stopping.ignore_eos = bool(options.ignore_eos)

    if options.sparsity_mode is not None:
        if options.sparsity_mode not in _MODE_TO_PB:
            raise ValidationError(
                f"sparsity_mode must be one of {', '.join(SPARSITY_MODES)}, got {options.sparsity_mode!r}"
            )
        request.sparsity_mode = _MODE_TO_PB[options.sparsity_mode]
    if options.request_id is not None:
        request.request_id = options.request_id
    request.details.tokens = options.return_tokens or options.return_logprobs
    request.details.logprobs = options.return_logprobs
    return request


def build_stream_request(
    prompt: str | Sequence[int], options: GenerateOptions, stream_interval: int
) -> pb.GenerateRequest:
    """``build_generate_request`` plus GenerateStream's ``stream_interval`` (tokens per message)."""
    request = build_generate_request(prompt, options)
    _set_int(request, "stream_interval", stream_interval, "stream_interval", 0, _UINT32_MAX)
    return request


def _set_int(message: Any, attr: str, value: int | None, name: str, low: int, high: int) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ValidationError(f"{name} must be an integer in [{low}, {high}], got {value!r}")
    setattr(message, attr, value)


_T = TypeVar("_T")


def _flat(message: Any, cls: type[_T]) -> _T:
    """A dataclass whose fields are all same-named scalar fields of ``message``."""
    return cls(**{f.name: getattr(message, f.name) for f in fields(cls)})  # type: ignore[arg-type]


def _optional(message: Any, name: str) -> Any:
    return getattr(message, name) if message.HasField(name) else None


def _mode(value: int) -> str:
    return _MODE_FROM_PB.get(value, "unspecified")


def tokens_from_pb(tokens: Any) -> tuple[Token, ...]:
    return tuple(Token(t.id, t.text, _optional(t, "logprob")) for t in tokens)


def report_from_pb(report: pb.SparsityReport) -> SparsityReport:
    layers = tuple(
        LayerSparsity(
            layer.predicted_active_share,
            _optional(layer, "true_active_share"),
            _optional(layer, "recall"),
        )
        for layer in report.layers
    )
    return SparsityReport(
        mode=_mode(report.mode),
        tokens=report.tokens,
        computed_share=report.computed_share,
        layers=layers,
        hot_share=report.hot_share,
        cold_share=report.cold_share,
        ffn_bytes_read=report.ffn_bytes_read,
        ffn_bytes_dense=report.ffn_bytes_dense,
    )


def finish_from_pb(value: int) -> FinishReason | None:
    return _FINISH_FROM_PB.get(value)


def result_from_pb(response: pb.GenerateResponse) -> GenerateResult:
    finish = finish_from_pb(response.finish_reason)
    if finish is None:
        raise ValueError("server sent a GenerateResponse without a finish_reason")
    return GenerateResult(
        request_id=response.request_id,
        text=response.text,
        tokens=tokens_from_pb(response.tokens),
        finish_reason=finish,
        usage=_flat(response.usage, Usage),
        timings=_flat(response.timings, Timings),
        sparsity=report_from_pb(response.sparsity),
        seed=response.seed,
    )


def chunk_from_pb(message: pb.GenerateStreamResponse) -> StreamChunk:
    finish = finish_from_pb(message.finish_reason)
    if finish is None:
        return StreamChunk(message.request_id, message.text, tokens_from_pb(message.tokens))
    return StreamChunk(
        request_id=message.request_id,
        text=message.text,
        tokens=tokens_from_pb(message.tokens),
        finish_reason=finish,
        usage=_flat(message.usage, Usage),
        timings=_flat(message.timings, Timings),
        sparsity=report_from_pb(message.sparsity),
        seed=message.seed,
    )


def tokenize_from_pb(response: pb.TokenizeResponse) -> TokenizeResult:
    return TokenizeResult(tuple(response.ids), tuple(response.pieces))


def model_info_from_pb(response: pb.ModelInfoResponse) -> ModelInfo:
    p = response.placement
    placement = Placement(
        hot_device=p.hot_device,
        cold_device=p.cold_device,
        hot_neurons_per_layer=tuple(p.hot_neurons_per_layer),
        hot_ffn_bytes=p.hot_ffn_bytes,
        cold_ffn_bytes=p.cold_ffn_bytes,
        expected_hot_share=p.expected_hot_share,
        gpu_memory_budget_bytes=p.gpu_memory_budget_bytes,
        gpu_memory_used_bytes=p.gpu_memory_used_bytes,
    )
    return ModelInfo(
        model_id=response.model_id,
        architecture=response.architecture,
        activation=response.activation,
        num_layers=response.num_layers,
        hidden_size=response.hidden_size,
        neurons_per_layer=tuple(response.neurons_per_layer),
        vocab_size=response.vocab_size,
        max_context=response.max_context,
        dtype=response.dtype,
        default_sparsity_mode=_mode(response.default_sparsity_mode),
        available_sparsity_modes=tuple(_mode(m) for m in response.available_sparsity_modes),
        cett_target=_optional(response, "cett_target"),
        predictor_recall=_optional(response, "predictor_recall"),
        placement=placement,
        limits=_flat(response.limits, Limits),
        server_version=response.server_version,
    )
