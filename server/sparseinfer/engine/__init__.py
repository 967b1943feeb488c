"""The engine: what runs a loaded model, step by step, for many requests at once.

Where things are:
- ``factory.load_engine``: the one way to build an ``Engine`` from a checkpoint and an ``EngineConfig``;
- ``generate.Engine``: start / prefill_batch / decode_step over a KV cache, and loops on top;
- ``sequence``, ``sampling``: one request's state, and how it picks tokens;
- ``accounting``: the per-request sparsity tally and report;
- the hot/cold split: ``placement`` decides which neurons are hot under a GPU memory budget,
  ``hybrid`` holds each layer's tiers and runs the hot and cold parts at once, ``modes.SparseRuntime``
  installs them (with the sidecar's thresholds and predictors) as ``sparse_ffn.SparseFFN`` executors;
- ``errors``: what a caller of the step API must tell apart.
"""

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
