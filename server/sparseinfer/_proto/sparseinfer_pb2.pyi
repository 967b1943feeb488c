from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class SparsityMode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SPARSITY_MODE_UNSPECIFIED: _ClassVar[SparsityMode]
    SPARSITY_MODE_DENSE: _ClassVar[SparsityMode]
    SPARSITY_MODE_ORACLE: _ClassVar[SparsityMode]
    SPARSITY_MODE_PREDICTED: _ClassVar[SparsityMode]

class FinishReason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    FINISH_REASON_UNSPECIFIED: _ClassVar[FinishReason]
    FINISH_REASON_LENGTH: _ClassVar[FinishReason]
    FINISH_REASON_EOS: _ClassVar[FinishReason]
    FINISH_REASON_STOP_SEQUENCE: _ClassVar[FinishReason]
    FINISH_REASON_CANCELLED: _ClassVar[FinishReason]
    FINISH_REASON_DEADLINE: _ClassVar[FinishReason]
SPARSITY_MODE_UNSPECIFIED: SparsityMode
SPARSITY_MODE_DENSE: SparsityMode
SPARSITY_MODE_ORACLE: SparsityMode
SPARSITY_MODE_PREDICTED: SparsityMode
FINISH_REASON_UNSPECIFIED: FinishReason
FINISH_REASON_LENGTH: FinishReason
FINISH_REASON_EOS: FinishReason
FINISH_REASON_STOP_SEQUENCE: FinishReason
FINISH_REASON_CANCELLED: FinishReason
FINISH_REASON_DEADLINE: FinishReason

class GenerateRequest(_message.Message):
    __slots__ = ("text", "token_ids", "sampling", "stopping", "sparsity_mode", "request_id", "details", "stream_interval")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    STOPPING_FIELD_NUMBER: _ClassVar[int]
    SPARSITY_MODE_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    DETAILS_FIELD_NUMBER: _ClassVar[int]
    STREAM_INTERVAL_FIELD_NUMBER: _ClassVar[int]
    text: str
    token_ids: TokenIds
    sampling: SamplingParameters
    stopping: StoppingCriteria
    sparsity_mode: SparsityMode
    request_id: str
    details: DetailsOptions
    stream_interval: int
    def __init__(self, text: _Optional[str] = ..., token_ids: _Optional[_Union[TokenIds, _Mapping]] = ..., sampling: _Optional[_Union[SamplingParameters, _Mapping]] = ..., stopping: _Optional[_Union[StoppingCriteria, _Mapping]] = ..., sparsity_mode: _Optional[_Union[SparsityMode, str]] = ..., request_id: _Optional[str] = ..., details: _Optional[_Union[DetailsOptions, _Mapping]] = ..., stream_interval: _Optional[int] = ...) -> None: ...

class TokenIds(_message.Message):
    __slots__ = ("ids",)
    IDS_FIELD_NUMBER: _ClassVar[int]
    ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, ids: _Optional[_Iterable[int]] = ...) -> None: ...

class SamplingParameters(_message.Message):
    __slots__ = ("temperature", "top_k", "top_p", "repetition_penalty", "seed")
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    REPETITION_PENALTY_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    temperature: float
    top_k: int
    top_p: float
    repetition_penalty: float
    seed: int
    def __init__(self, temperature: _Optional[float] = ..., top_k: _Optional[int] = ..., top_p: _Optional[float] = ..., repetition_penalty: _Optional[float] = ..., seed: _Optional[int] = ...) -> None: ...

class StoppingCriteria(_message.Message):
    __slots__ = ("max_new_tokens", "stop_sequences", "ignore_eos")
    MAX_NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    STOP_SEQUENCES_FIELD_NUMBER: _ClassVar[int]
    IGNORE_EOS_FIELD_NUMBER: _ClassVar[int]
    max_new_tokens: int
    stop_sequences: _containers.RepeatedScalarFieldContainer[str]
    ignore_eos: bool
    def __init__(self, max_new_tokens: _Optional[int] = ..., stop_sequences: _Optional[_Iterable[str]] = ..., ignore_eos: _Optional[bool] = ...) -> None: ...

class DetailsOptions(_message.Message):
    __slots__ = ("tokens", "logprobs")
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    tokens: bool
    logprobs: bool
    def __init__(self, tokens: _Optional[bool] = ..., logprobs: _Optional[bool] = ...) -> None: ...

class GenerateResponse(_message.Message):
    __slots__ = ("request_id", "text", "tokens", "finish_reason", "usage", "timings", "sparsity", "seed")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    SPARSITY_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    text: str
    tokens: _containers.RepeatedCompositeFieldContainer[Token]
    finish_reason: FinishReason
    usage: Usage
    timings: Timings
    sparsity: SparsityReport
    seed: int
    def __init__(self, request_id: _Optional[str] = ..., text: _Optional[str] = ..., tokens: _Optional[_Iterable[_Union[Token, _Mapping]]] = ..., finish_reason: _Optional[_Union[FinishReason, str]] = ..., usage: _Optional[_Union[Usage, _Mapping]] = ..., timings: _Optional[_Union[Timings, _Mapping]] = ..., sparsity: _Optional[_Union[SparsityReport, _Mapping]] = ..., seed: _Optional[int] = ...) -> None: ...

class GenerateStreamResponse(_message.Message):
    __slots__ = ("request_id", "text", "tokens", "finish_reason", "usage", "timings", "sparsity", "seed")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    SPARSITY_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    text: str
    tokens: _containers.RepeatedCompositeFieldContainer[Token]
    finish_reason: FinishReason
    usage: Usage
    timings: Timings
    sparsity: SparsityReport
    seed: int
    def __init__(self, request_id: _Optional[str] = ..., text: _Optional[str] = ..., tokens: _Optional[_Iterable[_Union[Token, _Mapping]]] = ..., finish_reason: _Optional[_Union[FinishReason, str]] = ..., usage: _Optional[_Union[Usage, _Mapping]] = ..., timings: _Optional[_Union[Timings, _Mapping]] = ..., sparsity: _Optional[_Union[SparsityReport, _Mapping]] = ..., seed: _Optional[int] = ...) -> None: ...

class Token(_message.Message):
    __slots__ = ("id", "text", "logprob")
    ID_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    LOGPROB_FIELD_NUMBER: _ClassVar[int]
    id: int
    text: str
    logprob: float
    def __init__(self, id: _Optional[int] = ..., text: _Optional[str] = ..., logprob: _Optional[float] = ...) -> None: ...

class Usage(_message.Message):
    __slots__ = ("prompt_tokens", "generated_tokens")
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    GENERATED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    prompt_tokens: int
    generated_tokens: int
    def __init__(self, prompt_tokens: _Optional[int] = ..., generated_tokens: _Optional[int] = ...) -> None: ...

class Timings(_message.Message):
    __slots__ = ("queue_s", "prefill_s", "ttft_s", "per_token_s", "total_s")
    QUEUE_S_FIELD_NUMBER: _ClassVar[int]
    PREFILL_S_FIELD_NUMBER: _ClassVar[int]
    TTFT_S_FIELD_NUMBER: _ClassVar[int]
    PER_TOKEN_S_FIELD_NUMBER: _ClassVar[int]
    TOTAL_S_FIELD_NUMBER: _ClassVar[int]
    queue_s: float
    prefill_s: float
    ttft_s: float
    per_token_s: float
    total_s: float
    def __init__(self, queue_s: _Optional[float] = ..., prefill_s: _Optional[float] = ..., ttft_s: _Optional[float] = ..., per_token_s: _Optional[float] = ..., total_s: _Optional[float] = ...) -> None: ...

class SparsityReport(_message.Message):
    __slots__ = ("mode", "tokens", "computed_share", "layers", "hot_share", "cold_share", "ffn_bytes_read", "ffn_bytes_dense")
    MODE_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    COMPUTED_SHARE_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    HOT_SHARE_FIELD_NUMBER: _ClassVar[int]
    COLD_SHARE_FIELD_NUMBER: _ClassVar[int]
    FFN_BYTES_READ_FIELD_NUMBER: _ClassVar[int]
    FFN_BYTES_DENSE_FIELD_NUMBER: _ClassVar[int]
    mode: SparsityMode
    tokens: int
    computed_share: float
    layers: _containers.RepeatedCompositeFieldContainer[LayerSparsity]
    hot_share: float
    cold_share: float
    ffn_bytes_read: int
    ffn_bytes_dense: int
    def __init__(self, mode: _Optional[_Union[SparsityMode, str]] = ..., tokens: _Optional[int] = ..., computed_share: _Optional[float] = ..., layers: _Optional[_Iterable[_Union[LayerSparsity, _Mapping]]] = ..., hot_share: _Optional[float] = ..., cold_share: _Optional[float] = ..., ffn_bytes_read: _Optional[int] = ..., ffn_bytes_dense: _Optional[int] = ...) -> None: ...

class LayerSparsity(_message.Message):
    __slots__ = ("predicted_active_share", "true_active_share", "recall")
    PREDICTED_ACTIVE_SHARE_FIELD_NUMBER: _ClassVar[int]
    TRUE_ACTIVE_SHARE_FIELD_NUMBER: _ClassVar[int]
    RECALL_FIELD_NUMBER: _ClassVar[int]
    predicted_active_share: float
    true_active_share: float
    recall: float
    def __init__(self, predicted_active_share: _Optional[float] = ..., true_active_share: _Optional[float] = ..., recall: _Optional[float] = ...) -> None: ...

class TokenizeRequest(_message.Message):
    __slots__ = ("text",)
    TEXT_FIELD_NUMBER: _ClassVar[int]
    text: str
    def __init__(self, text: _Optional[str] = ...) -> None: ...

class TokenizeResponse(_message.Message):
    __slots__ = ("ids", "pieces")
    IDS_FIELD_NUMBER: _ClassVar[int]
    PIECES_FIELD_NUMBER: _ClassVar[int]
    ids: _containers.RepeatedScalarFieldContainer[int]
    pieces: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, ids: _Optional[_Iterable[int]] = ..., pieces: _Optional[_Iterable[str]] = ...) -> None: ...

class ModelInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ModelInfoResponse(_message.Message):
    __slots__ = ("model_id", "architecture", "activation", "num_layers", "hidden_size", "neurons_per_layer", "vocab_size", "max_context", "dtype", "default_sparsity_mode", "available_sparsity_modes", "cett_target", "predictor_recall", "placement", "limits", "server_version")
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    ARCHITECTURE_FIELD_NUMBER: _ClassVar[int]
    ACTIVATION_FIELD_NUMBER: _ClassVar[int]
    NUM_LAYERS_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_SIZE_FIELD_NUMBER: _ClassVar[int]
    NEURONS_PER_LAYER_FIELD_NUMBER: _ClassVar[int]
    VOCAB_SIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_CONTEXT_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_SPARSITY_MODE_FIELD_NUMBER: _ClassVar[int]
    AVAILABLE_SPARSITY_MODES_FIELD_NUMBER: _ClassVar[int]
    CETT_TARGET_FIELD_NUMBER: _ClassVar[int]
    PREDICTOR_RECALL_FIELD_NUMBER: _ClassVar[int]
    PLACEMENT_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    SERVER_VERSION_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    architecture: str
    activation: str
    num_layers: int
    hidden_size: int
    neurons_per_layer: _containers.RepeatedScalarFieldContainer[int]
    vocab_size: int
    max_context: int
    dtype: str
    default_sparsity_mode: SparsityMode
    available_sparsity_modes: _containers.RepeatedScalarFieldContainer[SparsityMode]
    cett_target: float
    predictor_recall: float
    placement: Placement
    limits: Limits
    server_version: str
    def __init__(self, model_id: _Optional[str] = ..., architecture: _Optional[str] = ..., activation: _Optional[str] = ..., num_layers: _Optional[int] = ..., hidden_size: _Optional[int] = ..., neurons_per_layer: _Optional[_Iterable[int]] = ..., vocab_size: _Optional[int] = ..., max_context: _Optional[int] = ..., dtype: _Optional[str] = ..., default_sparsity_mode: _Optional[_Union[SparsityMode, str]] = ..., available_sparsity_modes: _Optional[_Iterable[_Union[SparsityMode, str]]] = ..., cett_target: _Optional[float] = ..., predictor_recall: _Optional[float] = ..., placement: _Optional[_Union[Placement, _Mapping]] = ..., limits: _Optional[_Union[Limits, _Mapping]] = ..., server_version: _Optional[str] = ...) -> None: ...

class Placement(_message.Message):
    __slots__ = ("hot_device", "cold_device", "hot_neurons_per_layer", "hot_ffn_bytes", "cold_ffn_bytes", "expected_hot_share", "gpu_memory_budget_bytes", "gpu_memory_used_bytes")
    HOT_DEVICE_FIELD_NUMBER: _ClassVar[int]
    COLD_DEVICE_FIELD_NUMBER: _ClassVar[int]
    HOT_NEURONS_PER_LAYER_FIELD_NUMBER: _ClassVar[int]
    HOT_FFN_BYTES_FIELD_NUMBER: _ClassVar[int]
    COLD_FFN_BYTES_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_HOT_SHARE_FIELD_NUMBER: _ClassVar[int]
    GPU_MEMORY_BUDGET_BYTES_FIELD_NUMBER: _ClassVar[int]
    GPU_MEMORY_USED_BYTES_FIELD_NUMBER: _ClassVar[int]
    hot_device: str
    cold_device: str
    hot_neurons_per_layer: _containers.RepeatedScalarFieldContainer[int]
    hot_ffn_bytes: int
    cold_ffn_bytes: int
    expected_hot_share: float
    gpu_memory_budget_bytes: int
    gpu_memory_used_bytes: int
    def __init__(self, hot_device: _Optional[str] = ..., cold_device: _Optional[str] = ..., hot_neurons_per_layer: _Optional[_Iterable[int]] = ..., hot_ffn_bytes: _Optional[int] = ..., cold_ffn_bytes: _Optional[int] = ..., expected_hot_share: _Optional[float] = ..., gpu_memory_budget_bytes: _Optional[int] = ..., gpu_memory_used_bytes: _Optional[int] = ...) -> None: ...

class Limits(_message.Message):
    __slots__ = ("max_batch_size", "max_queued_requests", "max_total_tokens", "max_prompt_tokens", "max_new_tokens", "default_max_new_tokens", "max_stop_sequences", "max_stop_sequence_length", "max_message_bytes", "max_prompt_bytes")
    MAX_BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_QUEUED_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    MAX_TOTAL_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MAX_PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MAX_NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_MAX_NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MAX_STOP_SEQUENCES_FIELD_NUMBER: _ClassVar[int]
    MAX_STOP_SEQUENCE_LENGTH_FIELD_NUMBER: _ClassVar[int]
    MAX_MESSAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_PROMPT_BYTES_FIELD_NUMBER: _ClassVar[int]
    max_batch_size: int
    max_queued_requests: int
    max_total_tokens: int
    max_prompt_tokens: int
    max_new_tokens: int
    default_max_new_tokens: int
    max_stop_sequences: int
    max_stop_sequence_length: int
    max_message_bytes: int
    max_prompt_bytes: int
    def __init__(self, max_batch_size: _Optional[int] = ..., max_queued_requests: _Optional[int] = ..., max_total_tokens: _Optional[int] = ..., max_prompt_tokens: _Optional[int] = ..., max_new_tokens: _Optional[int] = ..., default_max_new_tokens: _Optional[int] = ..., max_stop_sequences: _Optional[int] = ..., max_stop_sequence_length: _Optional[int] = ..., max_message_bytes: _Optional[int] = ..., max_prompt_bytes: _Optional[int] = ...) -> None: ...
