"""What ``ModelInfo`` answers, as domain objects built once at load (``describe``); the servicer's edge
turns them into the wire message (``convert.model_info_to_pb``). Field names follow the .proto's."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

import sparseinfer
from sparseinfer.engine.generate import Engine
from sparseinfer.engine.modes import SparseRuntime
from sparseinfer.engine.placement import neuron_bytes
from sparseinfer.model.step import MODES, SparsityMode
from sparseinfer.serving.config import ServeConfig


@dataclass(frozen=True)
class PlacementInfo:
    hot_device: str
    cold_device: str
    hot_neurons_per_layer: tuple[int, ...]
    hot_ffn_bytes: int
    cold_ffn_bytes: int
    expected_hot_share: float
    gpu_memory_budget_bytes: int
    gpu_memory_used_bytes: int


@dataclass(frozen=True)
class LimitsInfo:
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


@dataclass(frozen=True)
class ModelDescription:
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
    placement: PlacementInfo
    limits: LimitsInfo
    server_version: str


def describe(config: ServeConfig, engine: Engine, directory: Path) -> ModelDescription:
    model = engine.model
    c = model.config
    runtime = engine.sparsity
    available: tuple[str, ...] = (SparsityMode.DENSE,)
    cett: float | None = None
    recall: float | None = None
    if runtime is not None:
        available = tuple(m for m in MODES if _can_run(runtime, m))
        cett, recall = _sidecar_figures(directory)
    lim = config.limits
    seq, per_token = engine.max_seq, engine.max_bytes_per_token
    return ModelDescription(
        model_id=directory.name,
        architecture=c.architecture,
        activation=c.activation,
        num_layers=c.num_layers,
        hidden_size=c.hidden_size,
        neurons_per_layer=(c.intermediate_size,) * c.num_layers,
        vocab_size=c.vocab_size,
        max_context=seq,
        dtype=str(model.dtype).removeprefix("torch."),
        default_sparsity_mode=config.sparsity,
        available_sparsity_modes=available,
        cett_target=cett,
        predictor_recall=recall,
        placement=_placement(runtime, c.num_layers, c.intermediate_size, engine.device, neuron_bytes(model)),
        limits=LimitsInfo(
            max_batch_size=lim.max_batch_size,
            max_queued_requests=lim.max_queue,
            max_total_tokens=lim.max_total_tokens or lim.max_batch_size * seq,
            max_prompt_tokens=lim.prompt_tokens(seq),
            max_new_tokens=lim.max_new_tokens,
            default_max_new_tokens=min(lim.default_max_new_tokens, lim.max_new_tokens),
            max_stop_sequences=lim.max_stop_sequences,
            max_stop_sequence_length=lim.max_stop_length,
            max_message_bytes=lim.request_bytes(seq, per_token),
            max_prompt_bytes=lim.prompt_bytes(seq, per_token),
        ),
        server_version=sparseinfer.__version__,
    )


def _can_run(runtime: SparseRuntime, mode: str) -> bool:
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


def _placement(
    runtime: SparseRuntime | None, num_layers: int, m: int, device: torch.device, per_neuron: int
) -> PlacementInfo:
    placement = runtime.placement if runtime is not None else None
    used = torch.cuda.memory_allocated() if torch.cuda.is_available() else 0
    if placement is None:  # one tier on the model's device
        return PlacementInfo(
            str(device), "cpu", (m,) * num_layers, per_neuron * m * num_layers, 0, 1.0, 0, used
        )
    return PlacementInfo(
        hot_device=str(placement.hot_device),
        cold_device="cpu",
        hot_neurons_per_layer=tuple(int(h.numel()) for h in placement.hot),
        hot_ffn_bytes=placement.hot_bytes,
        cold_ffn_bytes=placement.cold_bytes,
        expected_hot_share=placement.expected_hot_share,
        gpu_memory_budget_bytes=placement.budget,
        gpu_memory_used_bytes=used,
    )
