"""Activation predictors (PAPER.md, "Predictors"): one low-rank MLP per FFN layer that guesses, from the FFN
input x, which neurons will be active, so the sparse kernels never read the rows of the inactive ones.

    ŷ = sigmoid(W2 (W1 x + b1) + b2)        W1 (r, d), W2 (m, r)

The paper puts no nonlinearity between the two projections (then the predictor is a rank-r linear classifier);
PowerInfer puts a ReLU there, so ``hidden_activation="relu"`` is offered as an option.

Vocabulary used throughout:
- ``logits(x)``: W2 (W1 x + b1) + b2, before the sigmoid;
- ``probabilities(x)``: ŷ, the **score** in [0, 1]; every score threshold in this package (``predict``, the
  sidecar's ``predictor.score_threshold``) is on this scale, and a neuron is predicted active iff score ≥ t
  (the engine applies the same rule on the logit scale: ``strict_logit_threshold``);
- size: predictor parameters (weights and biases) as a percentage of the FFN's parameters (every weight and
  bias of gate/up/down projections), so a gated FFN (3·d·m) gets a larger default rank than a non-gated one.

``PredictorSet`` holds the per-layer predictors, their score thresholds and the training report, and moves
them in and out of the sidecar's ``predictor`` section (training lives in ``predictor_train.py``).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

DEFAULT_SIZE_FRACTION = 0.06  # PAPER.md: "size about 6% of the FFN's parameters"
HIDDEN_ACTIVATIONS = (None, "relu")


def ffn_parameter_count(ffn: nn.Module) -> int:
    """All parameters of an FFN (gate/up/down weights and biases): the denominator of the size %."""
    return sum(p.numel() for p in ffn.parameters())


def predictor_parameter_count(d: int, m: int, rank: int) -> int:
    """(d + m)·r weights plus r + m biases."""
    return (d + m) * rank + rank + m


def default_rank(d: int, m: int, ffn_params: int, fraction: float = DEFAULT_SIZE_FRACTION) -> int:
    """The rank whose weights (d + m)·r are closest to ``fraction`` of the FFN's parameters (at least 1).

    The paper gives the size (~6%) but not the rank; e.g. a 7B Llama layer (d 4096, m 11008, gated) gets 537.
    """
    return max(1, round(fraction * ffn_params / (d + m)))


def size_percent(d: int, m: int, rank: int, ffn_params: int) -> float:
    """Predictor size as a percentage of the FFN's parameters."""
    return 100.0 * predictor_parameter_count(d, m, rank) / ffn_params


def validate_rank(rank: int | None) -> None:
    if rank is not None and (not isinstance(rank, int) or rank <= 0):
        raise ValueError(f"rank must be a positive integer, got {rank!r}")


def validate_recall_target(recall_target: float) -> None:
    if not (0.0 < recall_target <= 1.0) or math.isnan(recall_target):
        raise ValueError(f"recall target must be in (0, 1], got {recall_target}")


def strict_logit_threshold(score_threshold: float) -> float:
    """The float32 logit θ with ``logit > θ`` ⟺ ``torch.sigmoid(logit) >= score_threshold`` for every float32
    logit: the trained rule (score ≥ t, ``LowRankPredictor.predict``) in the form the sparse kernels apply
    (``ops.select_active`` keeps score > threshold), exact at ties. -inf when every neuron passes, +inf when
    none can."""
    t = float(score_threshold)
    if t <= 0.0:
        return -math.inf
    passes = lambda i: bool(torch.sigmoid(_float_of(i)) >= t)  # noqa: E731  (i: an ordered float32 index)
    lo, hi = _ordered(-math.inf), _ordered(math.inf)  # passes(hi) holds unless t > 1
    if not passes(hi):
        return math.inf
    while hi - lo > 1:  # the smallest index that passes: ≤ 32 halvings of the float32 line
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if passes(mid) else (mid, hi)
    return float(_float_of(hi - 1))  # the float32 just below the smallest passing logit


def _ordered(value: float) -> int:
    """float32 ``value`` as an integer that orders like the floats (-0.0 and 0.0 collapse)."""
    bits = int(torch.tensor(value, dtype=torch.float32).view(torch.int32))
    return bits if bits >= 0 else -(bits & 0x7FFFFFFF)


def _float_of(index: int) -> torch.Tensor:
    bits = index if index >= 0 else (-index) | -0x80000000
    return torch.tensor(bits, dtype=torch.int32).view(torch.float32)


class LowRankPredictor(nn.Module):
    """ŷ = sigmoid(W2 φ(W1 x + b1) + b2), φ = identity (the paper) or ReLU (PowerInfer)."""

    def __init__(self, d: int, m: int, rank: int, hidden_activation: str | None = None) -> None:
        super().__init__()
        validate_rank(rank)
        if hidden_activation not in HIDDEN_ACTIVATIONS:
            raise ValueError(
                f"hidden_activation must be one of {HIDDEN_ACTIVATIONS}, got {hidden_activation!r}"
            )
        self.d, self.m, self.rank = d, m, rank
        self.hidden_activation = hidden_activation
        self.w1 = nn.Linear(d, rank)  # weight (r, d)
        self.w2 = nn.Linear(rank, m)  # weight (m, r)

    def reset_parameters(self, generator: torch.Generator) -> None:
        """nn.Linear's default init (U(±1/√fan_in)) drawn from ``generator``, so training is
        seed-deterministic without touching torch's global RNG."""
        with torch.no_grad():
            for layer in (self.w1, self.w2):
                bound = 1.0 / math.sqrt(layer.in_features)
                for p in (layer.weight, layer.bias):
                    u = torch.rand(p.shape, generator=generator, dtype=torch.float32)
                    p.copy_((u * 2 - 1) * bound)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """(..., d) -> (..., m) pre-sigmoid scores, float32 whatever the input dtype."""
        z = self.w1(x.to(self.w1.weight.dtype))  # (..., r)
        if self.hidden_activation == "relu":
            z = torch.relu(z)
        return self.w2(z)  # (..., m)

    def probabilities(self, x: torch.Tensor) -> torch.Tensor:
        """(..., d) -> (..., m) scores ŷ in [0, 1]."""
        return torch.sigmoid(self.logits(x))

    forward = probabilities

    @torch.no_grad()
    def predict(self, x: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
        """(..., d) -> (..., m) bool: predicted active iff score ≥ ``threshold``."""
        return self.probabilities(x) >= threshold

    @torch.no_grad()
    def top_k(self, x: torch.Tensor, k: int) -> torch.Tensor:
        """(..., d) -> (..., k) long: indices of the k highest-scoring neurons (the top-k selection rule)."""
        if not 0 < k <= self.m:
            raise ValueError(f"k must be in [1, {self.m}], got {k}")
        return self.logits(x).topk(k, dim=-1).indices


@dataclass
class LayerReport:
    """One layer's predictor figures. recall/precision/predicted_sparsity are on the held-out TEST tokens."""

    layer: int
    rank: int
    size_percent: float  # predictor parameters / FFN parameters × 100
    score_threshold: float  # chosen on the validation tokens to reach the recall target there
    recall: float  # test: truly active neurons predicted active / truly active (pooled over tokens)
    precision: float  # test: truly active among predicted active (pooled over tokens)
    predicted_sparsity: float  # test: share of (token, neuron) pairs predicted inactive
    true_sparsity: float  # test: share of (token, neuron) pairs truly inactive (the oracle's sparsity)
    validation_recall: float  # recall reached on the validation tokens with score_threshold
    pos_weight: float  # BCE weight of positives (negatives / positives on the training tokens)
    best_epoch: int  # the epoch (1-based) whose weights were kept: lowest validation loss
    train_tokens: int
    validation_tokens: int
    test_tokens: int


@dataclass
class PredictorSet:
    """Per-layer predictors, their score thresholds, and how they were trained (the report and split)."""

    predictors: list[LowRankPredictor]
    score_thresholds: torch.Tensor  # (L,) float32, on the probability scale
    recall_target: float
    reports: list[LayerReport] = field(default_factory=list)
    split: dict[str, list[int]] = field(default_factory=dict)  # sequence indices: train / validation / test
    settings: dict[str, Any] = field(default_factory=dict)  # epochs, lr, batch size, seed, split fractions

    def __len__(self) -> int:
        return len(self.predictors)

    @property
    def rank(self) -> int:
        return self.predictors[0].rank

    @torch.no_grad()
    def predict(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        """(..., d) -> (..., m) bool with the layer's calibrated score threshold."""
        return self.predictors[layer].predict(x, float(self.score_thresholds[layer]))

    def to(self, device: torch.device | str) -> PredictorSet:
        for p in self.predictors:
            p.to(device)
        return self

    # ---- the sidecar's predictor section ----
    def save(self, checkpoint_dir: str | Path, sidecar_dir: str | Path | None = None) -> Path:
        """Write the predictor section into the checkpoint's sidecar (which must hold a calibration of the
        same number of layers: the labels came from its thresholds); returns the sidecar directory."""
        from sparseinfer.sparsity.sidecar import Sidecar, SidecarError

        sidecar = Sidecar.load(checkpoint_dir, sidecar_dir=sidecar_dir)
        calibration = sidecar.require("calibration")
        if sidecar.thresholds.numel() != len(self):
            raise SidecarError(
                f"{sidecar.directory}: the calibration has {sidecar.thresholds.numel()} layers, "
                f"the predictors {len(self)}"
            )
        manifest = {**self.manifest(), "calibration_cett_target": calibration.get("cett_target")}
        sidecar.set_section("predictor", self.state_tensors(), manifest)
        sidecar.save()
        return sidecar.directory

    @classmethod
    def load(
        cls,
        checkpoint_dir: str | Path,
        sidecar_dir: str | Path | None = None,
        model_fingerprint: str | None = None,
    ) -> PredictorSet:
        """The predictors stored in the checkpoint's sidecar; SidecarError naming the command to run when the
        sidecar, its calibration or its predictor section is missing, or when it belongs to another model."""
        from sparseinfer.sparsity.sidecar import Sidecar

        sidecar = Sidecar.load(checkpoint_dir, model_fingerprint=model_fingerprint, sidecar_dir=sidecar_dir)
        sidecar.require("calibration")
        manifest = sidecar.require("predictor")
        return cls.from_state(sidecar.section_tensors("predictor"), manifest)

    # ---- (de)serialisation: tensor names are the shared contract ----
    def state_tensors(self) -> dict[str, torch.Tensor]:
        """``predictor.{l}.w1`` (r, d), ``.b1`` (r,), ``.w2`` (m, r), ``.b2`` (m,), and
        ``predictor.score_threshold`` (L,), all float32 on the CPU."""
        out: dict[str, torch.Tensor] = {}
        for i, p in enumerate(self.predictors):
            out[f"predictor.{i}.w1"] = p.w1.weight.detach().float().cpu().contiguous()
            out[f"predictor.{i}.b1"] = p.w1.bias.detach().float().cpu().contiguous()
            out[f"predictor.{i}.w2"] = p.w2.weight.detach().float().cpu().contiguous()
            out[f"predictor.{i}.b2"] = p.w2.bias.detach().float().cpu().contiguous()
        out["predictor.score_threshold"] = self.score_thresholds.detach().float().cpu().contiguous()
        return out

    def manifest(self) -> dict[str, Any]:
        return {
            "rank": self.rank,
            "hidden_activation": self.predictors[0].hidden_activation,
            "recall_target": self.recall_target,
            "score_scale": "probability",  # predicted active iff sigmoid(logits) >= score_threshold
            "metrics_on": "held-out test tokens",
            "layers": [asdict(r) for r in self.reports],
            "split": self.split,
            "settings": self.settings,
        }

    @classmethod
    def from_state(cls, tensors: dict[str, torch.Tensor], manifest: dict[str, Any]) -> PredictorSet:
        """Inverse of ``state_tensors`` + ``manifest``; ValueError naming a missing or misshapen tensor."""
        if "predictor.score_threshold" not in tensors:
            raise ValueError("predictor section has no tensor 'predictor.score_threshold'")
        thresholds = tensors["predictor.score_threshold"].float()
        hidden = manifest.get("hidden_activation")
        predictors = []
        for i in range(thresholds.numel()):
            names = [f"predictor.{i}.{k}" for k in ("w1", "b1", "w2", "b2")]
            missing = [n for n in names if n not in tensors]
            if missing:
                raise ValueError(f"predictor section is missing tensor(s) {missing}")
            w1, b1, w2, b2 = (tensors[n].float() for n in names)
            r, d = w1.shape
            m = w2.shape[0]
            if b1.shape != (r,) or w2.shape != (m, r) or b2.shape != (m,):
                raise ValueError(
                    f"predictor.{i}: inconsistent shapes w1 {tuple(w1.shape)}, "
                    f"b1 {tuple(b1.shape)}, w2 {tuple(w2.shape)}, b2 {tuple(b2.shape)}"
                )
            p = LowRankPredictor(d, m, r, hidden_activation=hidden)
            with torch.no_grad():
                p.w1.weight.copy_(w1)
                p.w1.bias.copy_(b1)
                p.w2.weight.copy_(w2)
                p.w2.bias.copy_(b2)
            predictors.append(p.eval())
        reports = [LayerReport(**r) for r in manifest.get("layers", [])]
        return cls(
            predictors=predictors,
            score_thresholds=thresholds,
            recall_target=float(manifest.get("recall_target", float("nan"))),
            reports=reports,
            split={k: list(v) for k, v in manifest.get("split", {}).items()},
            settings=dict(manifest.get("settings", {})),
        )
