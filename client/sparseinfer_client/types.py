"""Typed results the client returns: frozen dataclasses of plain Python values (no protobuf objects).

Enumerations travel as lower-case strings: finish reasons "length" | "eos" | "stop" | "cancelled" |
"deadline", sparsity modes "dense" | "oracle" | "predicted". Field meanings are documented in
proto/sparseinfer/v1/sparseinfer.proto; the names here are the same.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

FinishReason = Literal["length", "eos", "stop", "cancelled", "deadline"]
SparsityMode = Literal["dense", "oracle", "predicted"]
HealthStatus = Literal["SERVING", "NOT_SERVING", "UNKNOWN", "SERVICE_UNKNOWN"]

SPARSITY_MODES: tuple[str, ...] = ("dense", "oracle", "predicted")


@dataclass(frozen=True)
class Token:
    id: int
    text: str  # this token decoded on its own
    logprob: float | None  # set only when logprobs were requested


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    generated_tokens: int


@dataclass(frozen=True)
class Timings:
    """Server-side wall-clock seconds from when the server received the request."""

    queue_s: float
    prefill_s: float
    ttft_s: float
    per_token_s: float
    total_s: float


@dataclass(frozen=True)
class LayerSparsity:
    predicted_active_share: float
    true_active_share: float | None  # None when the server did not measure it
    recall: float | None


@dataclass(frozen=True)
class SparsityReport:
    """How sparse one request ran (its own rows only; never depends on batch-mates)."""

    mode: str
    tokens: int
    computed_share: float  # neurons computed / neurons a dense FFN computes, all layers
    layers: tuple[LayerSparsity, ...]
    hot_share: float
    cold_share: float
    ffn_bytes_read: int
    ffn_bytes_dense: int


@dataclass(frozen=True)
class GenerateResult:
    request_id: str
    text: str
    tokens: tuple[Token, ...]  # empty unless tokens or logprobs were requested
    finish_reason: FinishReason
    usage: Usage
    timings: Timings
    sparsity: SparsityReport
    seed: int  # the seed actually used, so the result can be replayed


@dataclass(frozen=True)
class StreamChunk:
    """One message of a stream. Only the last one has ``finish_reason`` and the summary fields set."""

    request_id: str
    text: str  # text that became final with this chunk (may be empty)
    tokens: tuple[Token, ...]
    finish_reason: FinishReason | None = None
    usage: Usage | None = None
    timings: Timings | None = None
    sparsity: SparsityReport | None = None
    seed: int | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass(frozen=True)
class TokenizeResult:
    ids: tuple[int, ...]
    pieces: tuple[str, ...]


@dataclass(frozen=True)
class Placement:
    hot_device: str
    cold_device: str
    hot_neurons_per_layer: tuple[int, ...]
    hot_ffn_bytes: int
    cold_ffn_bytes: int
    expected_hot_share: float
    gpu_memory_budget_bytes: int
    gpu_memory_used_bytes: int


@dataclass(frozen=True)
class Limits:
    max_batch_size: int
    max_queued_requests: int
    max_total_tokens: int
    max_prompt_tokens: int
    max_new_tokens: int
    default_max_new_tokens: int
    max_stop_sequences: int
    max_stop_sequence_length: int
    max_message_bytes: int
    max_prompt_bytes: int  # longest text prompt in UTF-8 bytes; longer ones are refused before tokenizing


@dataclass(frozen=True)
class ModelInfo:
    model_id: str
    architecture: str
    activation: str
    num_layers: int
    hidden_size: int
    neurons_per_layer: tuple[int, ...]
    vocab_size: int
    max_context: int
    dtype: str
    default_sparsity_mode: str
    available_sparsity_modes: tuple[str, ...]
    cett_target: float | None
    predictor_recall: float | None
    placement: Placement
    limits: Limits
    server_version: str
