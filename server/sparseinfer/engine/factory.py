"""The one way an ``Engine`` is built from a checkpoint directory and a frozen ``EngineConfig``.

The CLI (``generate``), the server (``serving.model_setup``) and the benchmarks all call ``load_engine``, so
a benchmark's baseline is the server's engine by construction. Everything that decides how the checkpoint is
loaded and run is in the config, read once (flags and ``cli.read_environment``) and passed down; nothing
below reads the environment.

A sparse runtime is installed when the default mode needs one, when a GPU memory budget asks for hot/cold
placement, or (``per_request_modes``) whenever the checkpoint has a sparsity sidecar, so that requests may
choose oracle or predicted even when the default is dense. Without one, every request runs dense.
"""

from __future__ import annotations

import contextlib
import ctypes
from dataclasses import dataclass, field
from pathlib import Path

import torch

from sparseinfer.engine.ffn_calibration import calibrate_crossovers
from sparseinfer.engine.generate import Engine
from sparseinfer.engine.modes import SparseRuntime, SparsityConfig
from sparseinfer.model.linear import check_choice, use_row_kernels
from sparseinfer.model.quant import quantize_linears, validate_weights
from sparseinfer.model.step import SparsityMode
from sparseinfer.model.tokenizer import Tokenizer


@dataclass(frozen=True)
class EngineConfig:
    dtype: torch.dtype | None = None  # compute dtype; None: the checkpoint's
    max_batch: int = 1  # KV-cache slots (sequences decoded together)
    max_seq: int | None = None  # positions per slot; None: the model's context length
    sparsity: SparsityConfig = field(default_factory=SparsityConfig)
    per_request_modes: bool = False  # install the sparse runtime whenever the sidecar allows (servers)
    dense_linear: str = "auto"  # kernel of the dense projections: auto | torch | rows (model.linear)
    weights: str = (
        "checkpoint"  # every decoder weight in the checkpoint's dtype, or q8_0 | q4_0 (model.quant)
    )
    threads: int | None = None  # torch CPU threads; None: torch's default

    def validate(self) -> None:
        self.sparsity.validate()
        if self.max_batch < 1:
            raise ValueError(f"max_batch must be ≥ 1, got {self.max_batch}")
        if self.max_seq is not None and self.max_seq < 1:
            raise ValueError(f"max_seq must be ≥ 1, got {self.max_seq}")
        check_choice(self.dense_linear)
        validate_weights(self.weights)
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"--threads must be ≥ 1, got {self.threads}")


def _own_weights(model: torch.nn.Module, hugepages: bool) -> None:
    """Copy every CPU parameter out of the checkpoint's memory mapping: the projections into huge pages
    (measured on 2 cores: a 4096 x 4096 bf16 batch-1 projection streams ~20 GB/s from them against ~17
    from the mapping's 4 KiB pages), the rest (embedding table, norms) plainly, so that nothing holds the
    mapping and the file pages loading touched leave the process's memory."""
    from sparseinfer.engine.hugepages import to_hugepages
    from sparseinfer.model.linear import Linear

    with torch.no_grad():
        for module in model.modules():
            for p in module.parameters(recurse=False):
                if p.device.type != "cpu":
                    continue
                moved = to_hugepages(p.data, hugepages) if isinstance(module, Linear) else p.data
                p.data = moved if moved.data_ptr() != p.data_ptr() else p.data.clone()


def return_freed_heap() -> None:
    """Give the heap pages that loading freed back to the OS (glibc's ``malloc_trim``; elsewhere nothing).

    Loading allocates and frees many tensors of a few MB (float copies of weights being quantized, stacked,
    moved): glibc keeps them in its heap, so the process stays that much larger than the weights it kept.
    Measured on the 32-layer 7B shape in q4_0: resident growth 4.25 GiB before the trim, 3.94 GiB after, for
    3.85 GiB of weights and KV cache."""
    with contextlib.suppress(OSError, AttributeError):  # AttributeError: not glibc
        ctypes.CDLL(None).malloc_trim(0)


def load_engine(model_dir: str | Path, config: EngineConfig, tokenizer: Tokenizer | None = None) -> Engine:
    """Load the checkpoint at ``model_dir`` and build its engine under ``config`` (``tokenizer``: one the
    caller already loaded from the same directory)."""
    from sparseinfer.model import load_model, load_tokenizer
    from sparseinfer.model.transformer import stack_projections
    from sparseinfer.sparsity.sidecar import Sidecar

    config.validate()
    directory = Path(model_dir)
    if not directory.is_dir():
        raise FileNotFoundError(f"--model {directory}: not a directory")
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(directory)
    model = load_model(directory, dtype=config.dtype, dense_linear=None)  # chosen below, once all is in place
    context = int(model.config.max_position_embeddings)
    max_seq = min(config.max_seq, context) if config.max_seq is not None else context
    sparse = config.sparsity
    sidecar_dir = sparse.sidecar_dir if sparse.sidecar_dir is not None else directory
    wants_runtime = (
        sparse.mode != SparsityMode.DENSE
        or sparse.gpu_memory is not None
        or (config.per_request_modes and Sidecar.exists(sidecar_dir))
    )
    runtime = None
    if wants_runtime and not model.config.mlp_bias:
        runtime = SparseRuntime.from_checkpoint(
            model, directory, sparse, config.max_batch, max_seq, config.weights
        )
    elif sparse.mode != SparsityMode.DENSE:
        raise ValueError(f"--sparsity {sparse.mode}: this model has FFN biases and can only run dense")
    stack_projections(model)
    if config.weights != "checkpoint":
        # Every projection the runtime did not take over (attention, lm_head; the FFN of a dense model):
        # the float weights go with the replaced modules.
        quantize_linears(model, config.weights, sparse.hugepages)
    _own_weights(model, sparse.hugepages)
    return_freed_heap()
    # On the weights as they will run (fused, in huge pages, the runtime's tiers): the calibration of a
    # new shape times the kernels on them.
    use_row_kernels(model, config.dense_linear)
    if runtime is not None:
        calibrate_crossovers(model)  # where the batched FFN steps take torch's GEMMs (needs rows_up_to)
    return Engine(model, tokenizer, max_batch=config.max_batch, max_seq=max_seq, sparsity=runtime)
