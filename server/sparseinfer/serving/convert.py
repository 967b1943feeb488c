"""Protobuf at the edge: wire messages → domain requests (``from_pb``, with validation that names the field
by its path in the .proto) and domain results → wire messages (``*_to_pb``). Only this module and the
servicer (which parses requests and builds responses) import protobuf.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

from sparseinfer._proto import sparseinfer_pb2 as pb
from sparseinfer.engine.accounting import SparsityReport
from sparseinfer.model.step import SparsityMode
from sparseinfer.serving.config import Limits
from sparseinfer.serving.model_info import ModelDescription
from sparseinfer.serving.requests import BatchRequest, Completion, ServingError, TokenChunk
from sparseinfer.serving.validation import RequestFields, build_request, spell_field

MODE_FROM_PB = {
    pb.SPARSITY_MODE_DENSE: SparsityMode.DENSE,
    pb.SPARSITY_MODE_ORACLE: SparsityMode.ORACLE,
    pb.SPARSITY_MODE_PREDICTED: SparsityMode.PREDICTED,
}
MODE_TO_PB = {v: k for k, v in MODE_FROM_PB.items()}
FINISH_TO_PB = {
    "length": pb.FINISH_REASON_LENGTH,
    "eos": pb.FINISH_REASON_EOS,
    "stop": pb.FINISH_REASON_STOP_SEQUENCE,
    "cancelled": pb.FINISH_REASON_CANCELLED,
}
# Batcher/engine field names → their path in the .proto, for INVALID_ARGUMENT messages.
FIELD_PATH = {
    "prompt": "prompt",
    "max_new_tokens": "stopping.max_new_tokens",
    "stop": "stopping.stop_sequences",
    "temperature": "sampling.temperature",
    "top_k": "sampling.top_k",
    "top_p": "sampling.top_p",
    "repetition_penalty": "sampling.repetition_penalty",
    "seed": "sampling.seed",
    "sparsity_mode": "sparsity_mode",
    "request_id": "request_id",
}


@dataclass(frozen=True)
class Details:
    # Also set by details.logprobs, which implies tokens; the values themselves ride on the TokenChunks.
    tokens: bool = False


def from_pb(msg: pb.GenerateRequest, limits: Limits, deadline: float | None) -> tuple[BatchRequest, Details]:
    """Validate a ``GenerateRequest`` (``validation.build_request``: the rules every front end shares) and
    turn it into the batcher's ``BatchRequest``; errors name the field by its domain name, which
    ``error_message`` spells as its .proto path."""
    which = msg.WhichOneof("prompt")
    if which is None:
        raise ServingError.invalid("prompt", "set prompt.text or prompt.token_ids")
    mode: str | None = None
    if msg.sparsity_mode != pb.SPARSITY_MODE_UNSPECIFIED:
        if msg.sparsity_mode not in MODE_FROM_PB:
            raise ServingError.invalid("sparsity_mode", f"unknown sparsity mode {msg.sparsity_mode}")
        mode = MODE_FROM_PB[msg.sparsity_mode]
    s, st = msg.sampling, msg.stopping
    fields = RequestFields(
        prompt=msg.text if which == "text" else tuple(msg.token_ids.ids),
        max_new_tokens=st.max_new_tokens if st.HasField("max_new_tokens") else None,
        stop=tuple(st.stop_sequences),
        temperature=s.temperature if s.HasField("temperature") else None,
        top_k=s.top_k if s.HasField("top_k") else None,
        top_p=s.top_p if s.HasField("top_p") else None,
        repetition_penalty=s.repetition_penalty if s.HasField("repetition_penalty") else None,
        seed=s.seed if s.HasField("seed") else None,
        ignore_eos=st.ignore_eos,
        logprobs=msg.details.logprobs,
        sparsity_mode=mode,
        request_id=msg.request_id,
        stream_interval=msg.stream_interval,
    )
    request = build_request(fields, limits, deadline)
    return request, Details(tokens=msg.details.tokens or msg.details.logprobs)


def field_path(name: str) -> str:
    """An engine or batcher field name (``stop[2]`` included) as its path in the .proto."""
    return spell_field(name, FIELD_PATH)


def error_message(err: ServingError) -> str:
    """The error's message with the field spelled as its .proto path."""
    if err.field is None:
        return err.message
    return f"{field_path(err.field)}: {err.detail}" if err.detail is not None else err.message


def tokens_to_pb(chunk: TokenChunk, piece: Callable[[int], str]) -> list[pb.Token]:
    if not chunk.logprobs:
        return [pb.Token(id=t, text=piece(t)) for t in chunk.token_ids]
    return [
        pb.Token(id=t, text=piece(t), logprob=lp)
        for t, lp in zip(chunk.token_ids, chunk.logprobs, strict=True)
    ]


def report_to_pb(r: SparsityReport) -> pb.SparsityReport:
    layers = []
    for layer in r.layers:
        out = pb.LayerSparsity(predicted_active_share=layer.predicted_active_share)
        if layer.true_active_share is not None:
            out.true_active_share = layer.true_active_share
        if layer.recall is not None:
            out.recall = layer.recall
        layers.append(out)
    return pb.SparsityReport(
        mode=MODE_TO_PB[r.mode],
        tokens=r.tokens,
        computed_share=r.computed_share,
        layers=layers,
        hot_share=r.hot_share,
        cold_share=r.cold_share,
        ffn_bytes_read=r.ffn_bytes_read,
        ffn_bytes_dense=r.ffn_bytes_dense,
    )


def model_info_to_pb(info: ModelDescription) -> pb.ModelInfoResponse:
    out = pb.ModelInfoResponse(
        model_id=info.model_id,
        architecture=info.architecture,
        activation=info.activation,
        num_layers=info.num_layers,
        hidden_size=info.hidden_size,
        neurons_per_layer=info.neurons_per_layer,
        vocab_size=info.vocab_size,
        max_context=info.max_context,
        dtype=info.dtype,
        default_sparsity_mode=MODE_TO_PB[info.default_sparsity_mode],
        available_sparsity_modes=[MODE_TO_PB[m] for m in info.available_sparsity_modes],
        placement=pb.Placement(**dataclasses.asdict(info.placement)),
        limits=pb.Limits(**dataclasses.asdict(info.limits)),
        server_version=info.server_version,
    )
    if info.cett_target is not None:
        out.cett_target = info.cett_target
    if info.predictor_recall is not None:
        out.predictor_recall = info.predictor_recall
    return out


def final_fields(c: Completion) -> dict[str, object]:
    """The fields a final message (unary response or last stream message) carries."""
    t = c.timings
    return {
        "finish_reason": FINISH_TO_PB[c.finish_reason],
        "usage": pb.Usage(prompt_tokens=c.prompt_tokens, generated_tokens=c.completion_tokens),
        "timings": pb.Timings(
            queue_s=t.queue_s,
            prefill_s=t.prefill_s,
            ttft_s=t.ttft_s,
            per_token_s=t.mean_inter_token_s,
            total_s=t.total_s,
        ),
        "sparsity": report_to_pb(c.sparsity),
        "seed": c.seed,
    }
