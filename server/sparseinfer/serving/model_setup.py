"""Load what a server serves: the checkpoint, its sparse runtime, the step-level ``Engine``, and the
(static) ``ModelInfo`` answer.

The engine is the one ``engine.factory.load_engine`` builds, with per-request modes on: a sparse runtime is
installed whenever the checkpoint has a sparsity sidecar, so requests can choose oracle or predicted even
when the default is dense.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

import sparseinfer
from sparseinfer.engine.generate import Engine
from sparseinfer.engine.placement import neuron_bytes
from sparseinfer.serving.config import ServeConfig
from sparseinfer.serving.convert import MODE_TO_PB
from sparseinfer_client._proto import sparseinfer_pb2 as pb


@dataclass
class Served:
    """A loaded model ready to serve."""

    engine: Engine
    model_dir: Path
    model_info: pb.ModelInfoResponse


def model_directory(config: ServeConfig) -> Path:
    if config.model is not None:
        return config.model
    try:
        from sparseinfer.model.bundled import bundled_model_path
    except ImportError:
        raise FileNotFoundError(
            "no model is bundled with this installation; pass --model DIR (a checkpoint directory)"
        ) from None
    return bundled_model_path()


def load_served(config: ServeConfig) -> Served:
    """Load the checkpoint and build the engine sized by ``config.limits`` (``engine.factory``)."""
    from sparseinfer.engine.factory import load_engine

    config.validate()
    directory = model_directory(config)
    engine = load_engine(directory, config.engine_config())
    return Served(engine, directory, model_info(config, engine, directory))


def model_info(config: ServeConfig, generator: Engine, directory: Path) -> pb.ModelInfoResponse:
    model = generator.model
    c = model.config
    runtime = generator.sparsity
    available = ["dense"]
    cett: float | None = None
    recall: float | None = None
    if runtime is not None:
        available = [m for m in ("dense", "oracle", "predicted") if _can_run(runtime, m)]
        cett, recall = _sidecar_figures(directory)
    limits = config.limits
    max_prompt = limits.prompt_tokens(generator.max_seq)
    info = pb.ModelInfoResponse(
        model_id=directory.name,
        architecture=c.architecture,
        activation=c.activation,
        num_layers=c.num_layers,
        hidden_size=c.hidden_size,
        neurons_per_layer=[c.intermediate_size] * c.num_layers,
        vocab_size=c.vocab_size,
        max_context=generator.max_seq,
        dtype=str(model.dtype).removeprefix("torch."),
        default_sparsity_mode=MODE_TO_PB[config.sparsity],
        available_sparsity_modes=[MODE_TO_PB[m] for m in available],
        placement=_placement(
            runtime, c.num_layers, c.intermediate_size, generator.device, neuron_bytes(model)
        ),
        limits=pb.Limits(
            max_batch_size=limits.max_batch_size,
            max_queued_requests=limits.max_queue,
            max_total_tokens=limits.max_total_tokens or limits.max_batch_size * generator.max_seq,
            max_prompt_tokens=max_prompt,
            max_new_tokens=limits.max_new_tokens,
            default_max_new_tokens=min(limits.default_max_new_tokens, limits.max_new_tokens),
            max_stop_sequences=limits.max_stop_sequences,
            max_stop_sequence_length=limits.max_stop_length,
            max_message_bytes=limits.request_bytes(generator.max_seq, generator.max_bytes_per_token),
            max_prompt_bytes=limits.prompt_bytes(generator.max_seq, generator.max_bytes_per_token),
        ),
        server_version=sparseinfer.__version__,
    )
    if cett is not None:
        info.cett_target = cett
    if recall is not None:
        info.predictor_recall = recall
    return info


def _can_run(runtime: Any, mode: str) -> bool:
    try:
        runtime.check_mode(mode)
    except ValueError:
        return False
    return True


def _sidecar_figures(directory: Path) -> tuple[float | None, float | None]:
    from sparseinfer.sparsity.sidecar import Sidecar

    if not Sidecar.exists(directory):
        return None, None
    sidecar = Sidecar.load(directory)
    cett = recall = None
    if sidecar.has("calibration"):
        value = sidecar.require("calibration").get("cett_target")
        cett = float(value) if value is not None else None
    if sidecar.has("predictor"):
        layers = sidecar.require("predictor").get("layers") or []
        recalls = [float(r["recall"]) for r in layers if r.get("recall") is not None]
        recall = sum(recalls) / len(recalls) if recalls else None
    return cett, recall


def _placement(runtime: Any, num_layers: int, m: int, device: torch.device, per_neuron: int) -> pb.Placement:
    placement = runtime.placement if runtime is not None else None
    used = torch.cuda.memory_allocated() if torch.cuda.is_available() else 0
    if placement is None:  # one tier on the model's device
        return pb.Placement(
            hot_device=str(device),
            cold_device="cpu",
            hot_neurons_per_layer=[m] * num_layers,
            hot_ffn_bytes=per_neuron * m * num_layers,
            cold_ffn_bytes=0,
            expected_hot_share=1.0,
            gpu_memory_used_bytes=used,
        )
    return pb.Placement(
        hot_device=str(placement.hot_device),
        cold_device="cpu",
        hot_neurons_per_layer=[int(h.numel()) for h in placement.hot],
        hot_ffn_bytes=placement.hot_bytes,
        cold_ffn_bytes=placement.cold_bytes,
        expected_hot_share=placement.expected_hot_share,
        gpu_memory_budget_bytes=placement.budget,
        gpu_memory_used_bytes=used,
    )
