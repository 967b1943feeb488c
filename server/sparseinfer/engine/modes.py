"""Sparse execution for a loaded model: load what the modes need from the sidecar, place the neurons, install
the executors, and turn each step's counts into the sequences' sparsity tallies.

Per-request modes: a ``Engine`` built with a ``SparseRuntime`` runs every request in its own mode
(``Engine.start(..., sparsity_mode=...)``, default ``SparsityConfig.mode``); one batched step mixes modes
freely because each row computes exactly its own active set (see ``sparse_ffn.py``). A mode whose sidecar
section is missing is refused when the request starts, with the command that writes the section.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from sparseinfer.engine.errors import InvalidRequest
from sparseinfer.engine.hybrid import DEFAULT_CROSSOVER, TieredFFN, make_tier
from sparseinfer.engine.placement import Placement, dense_bytes, neuron_bytes, plan_placement
from sparseinfer.engine.sparse_ffn import LayerPredictor, SparseFFN
from sparseinfer.model.quant import validate_weights
from sparseinfer.model.step import MODES, ForwardStep, SparsityMode
from sparseinfer.model.transformer import Transformer
from sparseinfer.sparsity.sidecar import PRODUCERS, Sidecar, SidecarError

# The sidecar sections each mode needs.
NEEDS = {
    SparsityMode.DENSE: (),
    SparsityMode.ORACLE: ("calibration",),
    SparsityMode.PREDICTED: ("calibration", "predictor"),
}


class ModeUnavailable(SidecarError, InvalidRequest):
    """A request's sparsity mode needs a sidecar section this runtime lacks (the message says what to run)."""

    def __init__(self, message: str) -> None:
        InvalidRequest.__init__(self, "sparsity_mode", message, message)


def validate_mode(mode: str, name: str = "sparsity mode") -> SparsityMode:
    """``mode`` as a ``SparsityMode``; ``InvalidRequest`` naming ``name`` for anything else."""
    if mode not in MODES:
        detail = f"must be one of {', '.join(MODES)}, got {mode!r}"
        raise InvalidRequest("sparsity_mode", detail, f"{name} {detail}")
    return SparsityMode(mode)


@dataclass(frozen=True)
class SparsityConfig:
    mode: str = SparsityMode.DENSE  # the default mode of requests that do not choose one
    gpu_memory: int | None = None  # bytes for the fast device; None: no placement (one tier, model's device)
    crossover: float | None = None  # union density above which a layer runs dense (None: hybrid's default)
    measure_truth: bool = False  # predicted/dense rows also compute the true active set (costs a dense FFN)
    sidecar_dir: Path | None = None  # where the sidecar is (default: the checkpoint directory)
    hugepages: bool = True  # copy CPU tiers and predictors into huge pages (engine.hugepages)

    def validate(self) -> None:
        validate_mode(self.mode, "--sparsity")
        if self.crossover is not None and not 0.0 <= self.crossover <= 1.0:
            raise ValueError(f"crossover must be in [0, 1], got {self.crossover}")
        if self.gpu_memory is not None and self.gpu_memory < 0:
            raise ValueError(f"--gpu-memory must be ≥ 0 bytes, got {self.gpu_memory}")


class SparseRuntime:
    """Installs the executors into ``model`` (its FFNs are replaced) and keeps what they share.

    ``thresholds`` (L,) ε_l and ``predictors`` come from the sidecar (None: that mode is unavailable);
    ``placement`` None keeps every neuron in one tier on the model's device."""

    def __init__(
        self,
        model: Transformer,
        config: SparsityConfig,
        thresholds: torch.Tensor | None,
        predictors: Sequence[LayerPredictor] | None,
        placement: Placement | None,
        sidecar_dir: Path | None = None,
        weights: str = "checkpoint",
    ) -> None:
        """``weights``: the FFN tiers' and predictors' format (``model.quant``: quantized at construction,
        CPU tiers only)."""
        config.validate()
        validate_weights(weights)
        if weights != "checkpoint" and (placement is not None or model.device.type != "cpu"):
            raise ValueError(f"--weights {weights}: quantized weights run on the CPU only (no --gpu-memory)")
        if model.config.mlp_bias:
            raise ValueError("sparse execution does not support FFN biases (mlp_bias); run this model dense")
        L, m = model.config.num_layers, model.config.intermediate_size
        if thresholds is not None and thresholds.numel() != L:
            raise SidecarError(f"the calibration has {thresholds.numel()} thresholds, the model {L} layers")
        if predictors is not None and len(predictors) != L:
            raise SidecarError(f"the sidecar has {len(predictors)} predictors, the model {L} layers")
        self.config = config
        self.measure_truth = config.measure_truth  # may be switched per step (e.g. to audit a predictor)
        self.placement = placement
        self.sidecar_dir = sidecar_dir
        self.layer_neurons = (m,) * L
        self.weights = weights
        self.neuron_bytes = (neuron_bytes(model, weights),) * L
        self._sections = {"calibration": thresholds is not None, "predictor": predictors is not None}
        self.check_mode(config.mode)
        crossover = config.crossover if config.crossover is not None else DEFAULT_CROSSOVER
        self.crossover = crossover  # every layer's (see SparseFFN.crossover)
        default_mode = SparsityMode(config.mode)
        out_device = placement.dense_device if placement is not None else model.device
        hp = config.hugepages
        for li, block in enumerate(model.layers):
            mlp = block.mlp
            w_in = mlp.gate_proj.weight.detach()  # (m, d)
            w_up = mlp.up_proj.weight.detach() if mlp.up_proj is not None else None  # (m, d)
            w_out = mlp.down_proj.weight.detach()  # (d, m)
            if placement is None:
                # One tier on the model's device: the report's "hot" means served by the GPU, so a
                # CPU-only model counts every neuron as cold.
                on_gpu = model.device.type != "cpu"
                tiers = [make_tier(w_in, w_up, w_out, torch.arange(m), model.device, on_gpu, hp, weights)]
            else:
                hot = placement.hot[li]
                cold = torch.ones(m, dtype=torch.bool)
                cold[hot] = False
                tiers = [
                    make_tier(w_in, w_up, w_out, hot, placement.hot_device, True, hp),
                    make_tier(w_in, w_up, w_out, cold.nonzero().flatten(), torch.device("cpu"), False, hp),
                ]
            # The kernels of the tiers' dense GEMMs and of the predictor: model.linear.use_row_kernels, run
            # by the engine once every weight is in place.
            tiered = TieredFFN(tiers, m, out_device, mlp.activation, model.config.activation_threshold)
            predictor = None
            if predictors is not None:
                predictor = predictors[li].to(out_device, model.dtype, hp, weights)
            eps = float(thresholds[li]) if thresholds is not None else None
            # The dense FFN's weights are dropped with it: the tiers hold the only copy.
            block.mlp = SparseFFN(li, tiered, eps, predictor, default_mode, crossover)
        if placement is not None:
            model.to(placement.dense_device)  # the executors' shards are plain tensors: .to leaves them be

    # ---- construction from a checkpoint's sidecar ----
    @classmethod
    def from_checkpoint(
        cls,
        model: Transformer,
        checkpoint_dir: str | Path,
        config: SparsityConfig,
        max_batch: int = 1,
        max_seq: int | None = None,
        weights: str = "checkpoint",
    ) -> SparseRuntime:
        """Load thresholds / predictors / profile from the checkpoint's sidecar (all that exist; the default
        mode's sections are required) and install the executors into ``model``, its FFNs and predictors in
        ``weights``."""
        config.validate()
        directory = config.sidecar_dir
        sidecar: Sidecar | None = None
        if Sidecar.exists(directory if directory is not None else Path(checkpoint_dir)):
            sidecar = Sidecar.load(checkpoint_dir, sidecar_dir=directory)
        for section in NEEDS[config.mode]:
            if sidecar is None or not sidecar.has(section):
                where = directory if directory is not None else checkpoint_dir
                raise SidecarError(
                    f"--sparsity {config.mode} needs the sparsity sidecar's {section} section, which {where} "
                    f"lacks; run `{PRODUCERS[section].replace('MODEL', str(checkpoint_dir))}` first"
                )
        thresholds = sidecar.thresholds if sidecar is not None and sidecar.has("calibration") else None
        predictors = None
        if sidecar is not None and sidecar.has("predictor") and thresholds is not None:
            predictors = _predictors(sidecar)
        placement = None
        if config.gpu_memory is not None:
            frequency = sidecar.tensors.get("profile.frequency") if sidecar is not None else None
            # The executors hold the predictors in the model dtype.
            extra = sum(p.numel for p in predictors) * model.dtype.itemsize if predictors is not None else 0
            c = model.config
            placement = plan_placement(
                frequency,
                c.num_layers,
                c.intermediate_size,
                neuron_bytes(model),
                config.gpu_memory,
                dense_bytes(model, max_batch, max_seq or c.max_position_embeddings, extra),
            )
        return cls(
            model, config, thresholds, predictors, placement, directory or Path(checkpoint_dir), weights
        )

    # ---- per-request modes ----
    def check_mode(self, mode: str) -> SparsityMode:
        """``mode`` if this runtime can run it; else an error naming the sidecar section and its command."""
        mode = validate_mode(mode)
        if mode != SparsityMode.DENSE:
            _require_sparse_ops()
        missing = [s for s in NEEDS[mode] if not self._sections[s]]
        if missing:
            section = missing[0]
            raise ModeUnavailable(
                f"sparsity mode {mode!r} needs the sparsity sidecar's {section} section"
                + (f" in {self.sidecar_dir}" if self.sidecar_dir is not None else "")
                + f"; run `{PRODUCERS[section]}` first"
            )
        return mode

    def step(self, modes: Sequence[str], lengths: Sequence[int] | None = None) -> ForwardStep:
        """A forward step of one row per mode (``lengths``: each row's real tokens when right-padded),
        measuring the true active sets when ``measure_truth`` is on."""
        return ForwardStep.of(modes, lengths, self.measure_truth)


class SparseOpsMissing(ValueError):
    """The compiled extension predates the sparse ops (a ValueError so the CLI reports it in one line)."""


def _require_sparse_ops() -> None:
    missing = [name for name in ("select_active", "sparse_ffn") if not hasattr(torch.ops.sparseinfer, name)]
    if missing:
        raise SparseOpsMissing(
            f"the installed sparseinfer extension lacks the sparse ops ({', '.join(missing)}): rebuild it "
            "(`pip install -e .`) to run the oracle and predicted modes"
        )


def _predictors(sidecar: Sidecar) -> list[LayerPredictor]:
    from sparseinfer.sparsity.predictor import PredictorSet

    ps = PredictorSet.from_state(sidecar.section_tensors("predictor"), sidecar.require("predictor"))
    return [
        LayerPredictor.from_trained(p, float(t))
        for p, t in zip(ps.predictors, ps.score_thresholds, strict=True)
    ]
