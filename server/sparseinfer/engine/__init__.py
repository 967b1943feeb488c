"""Generation engine: sampling, per-request sequence state, and the step-level generator over a KV cache."""

from sparseinfer.engine.accounting import LayerSparsity, SparsityReport, SparsityTally
from sparseinfer.engine.generate import Generator
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
    "FinishReason",
    "GenerationEvent",
    "GenerationResult",
    "GenerationStats",
    "Generator",
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
