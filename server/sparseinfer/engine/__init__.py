"""Generation engine: sampling, per-request sequence state, and the step-level generator over a KV cache."""

from sparseinfer.engine.accounting import LayerSparsity, SparsityReport, SparsityTally
from sparseinfer.engine.generate import Engine
from sparseinfer.engine.modes import SparseRuntime, SparsityConfig
from sparseinfer.engine.sampling import RequestSampler, SamplingParams, process_logits, sample_batch
from sparseinfer.engine.sequence import (
    FinishReason,
    GenerationEvent,
    GenerationResult,
    GenerationStats,
    Sequence,
    StopMatcher,
)

__all__ = [
    "Engine",
    "FinishReason",
    "GenerationEvent",
    "GenerationResult",
    "GenerationStats",
    "LayerSparsity",
    "RequestSampler",
    "SamplingParams",
    "Sequence",
    "SparseRuntime",
    "SparsityConfig",
    "SparsityReport",
    "SparsityTally",
    "StopMatcher",
    "process_logits",
    "sample_batch",
]
