"""Training the per-layer activation predictors (PAPER.md, "Predictors") with honest held-out numbers.

Protocol, per layer:
1. The calibration sequences are split by SEQUENCE (never by token, so neighbouring tokens of one text cannot
   leak across) into train / validation / test, seeded and disjoint.
2. Labels y_i = 1[|h_i|·‖W_out[:, i]‖₂ ≥ ε_l] (``neurons.active_mask``) with the calibrated ε_l.
3. The predictor is fitted on the train tokens with weighted BCE, pos_weight = negatives / positives of the
   layer's train labels (one scalar per layer: it balances the two classes so the sparse positives are not
   ignored; the recall target is then met by the threshold of step 4, not by the weight). Mini-batch Adam;
   the epoch with the lowest validation loss is kept.
4. The score threshold is the largest one whose recall on the VALIDATION tokens reaches the target
   (recall pooled over every (token, neuron) pair: truly active pairs predicted active / truly active pairs).
5. Recall, precision and predicted sparsity are then measured on the TEST tokens, used for nothing else.
   Recall on finitely many test tokens can fall a little short of the target that validation reached.

Memory (per layer, never all layers at once): the FFN inputs of the layer's tokens (N × d in the model dtype,
from ``capture.layerwise_ffn_inputs``, which streams layer by layer), the labels bit-packed (N × m / 8 bytes:
180 MB for 2^17 tokens of a 7B layer), the FFN's h for one chunk, and the validation positives' scores
(4 bytes per truly active validation pair) to pick the threshold exactly.

Time: at 7B scale a full run takes most of a day on a 2-core CPU (benchmarks/results/README.md, "Design
measurements"); use a GPU, or bound it with ``--tokens`` and ``--epochs``. The FFN-input capture and the
labels cost far less than training.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from sparseinfer.sparsity.predictor import (
    LayerReport,
    LowRankPredictor,
    PredictorSet,
    default_rank,
    ffn_parameter_count,
    size_percent,
    validate_rank,
    validate_recall_target,
)

SPLIT_NAMES = ("train", "validation", "test")
DEFAULT_EPOCHS = 20
DEFAULT_LR = 5e-3  # Adam; the epoch with the lowest validation loss is kept, so a noisy end does no harm
# 1024 tokens per step: far higher CPU throughput than 256 (benchmarks/results/README.md)
DEFAULT_BATCH_SIZE = 1024
_BITS = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8)


# ---- labels, bit-packed: 8× smaller than bool, so a 7B layer's 2^17 tokens fit in 180 MB ----
def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    """(N, m) bool -> (N, ceil(m / 8)) uint8, bit j of byte k = mask[:, 8k + j]."""
    n, m = mask.shape
    nbytes = (m + 7) // 8
    mask = F.pad(mask, (0, 8 * nbytes - m))  # (N, 8·ceil(m/8))
    return (mask.view(n, nbytes, 8).to(torch.uint8) * _BITS.to(mask.device)).sum(-1, dtype=torch.uint8)


def unpack_mask(packed: torch.Tensor, m: int) -> torch.Tensor:
    """Inverse of ``pack_mask``: (N, ceil(m / 8)) uint8 -> (N, m) bool."""
    bits = (packed.unsqueeze(-1) & _BITS.to(packed.device)) != 0  # (N, ceil(m/8), 8)
    return bits.view(packed.shape[0], 8 * packed.shape[1])[:, :m]


@dataclass
class LabeledTokens:
    """One split's FFN inputs and labels for one layer."""

    x: torch.Tensor  # (N, d), the model dtype
    labels: torch.Tensor  # (N, ceil(m / 8)) uint8, bit-packed
    m: int

    def __len__(self) -> int:
        return self.x.shape[0]

    def batches(
        self, size: int, order: torch.Tensor | None = None
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(x (B, d) float32, y (B, m) bool) in ``order`` (default: as stored)."""
        n = len(self)
        for start in range(0, n, size):
            idx = order[start : start + size] if order is not None else slice(start, min(start + size, n))
            yield self.x[idx].float(), unpack_mask(self.labels[idx], self.m)


def split_sequences(
    num_sequences: int, split: Sequence[float] = (0.8, 0.1, 0.1), seed: int = 0
) -> dict[str, list[int]]:
    """Disjoint, seeded train / validation / test sequence indices, each non-empty."""
    if len(split) != 3 or any(not (f > 0) for f in split) or abs(sum(split) - 1.0) > 1e-6:
        raise ValueError(
            f"split must be three positive fractions summing to 1 (train, validation, test), got {split}"
        )
    n_val, n_test = max(1, round(split[1] * num_sequences)), max(1, round(split[2] * num_sequences))
    n_train = num_sequences - n_val - n_test
    if n_train < 1:
        raise ValueError(
            f"need at least 3 calibration sequences for a train/validation/test split, got {num_sequences}"
        )
    perm = torch.randperm(num_sequences, generator=torch.Generator().manual_seed(seed)).tolist()
    return {
        "train": sorted(perm[:n_train]),
        "validation": sorted(perm[n_train : n_train + n_val]),
        "test": sorted(perm[n_train + n_val :]),
    }


@torch.no_grad()
def layer_labels(
    ffn: nn.Module, x: torch.Tensor, norms: torch.Tensor, eps: float, chunk: int = 4096
) -> torch.Tensor:
    """Bit-packed active mask (N, ceil(m / 8)) of the FFN's neurons for inputs x (N, d), h in chunks."""
    from sparseinfer.sparsity.neurons import active_mask

    parts = [pack_mask(active_mask(ffn.neuron_activations(xc), norms, eps)) for xc in x.split(chunk)]
    return torch.cat(parts) if parts else torch.zeros(0, 0, dtype=torch.uint8)


def _positive_rate(data: LabeledTokens, chunk: int = 4096) -> float:
    active = sum(int(y.sum()) for _, y in data.batches(chunk))
    return active / max(1, len(data) * data.m)


@torch.no_grad()
def _mean_loss(
    predictor: LowRankPredictor, data: LabeledTokens, pos_weight: torch.Tensor, chunk: int
) -> float:
    total = 0.0
    for x, y in data.batches(chunk):
        loss = F.binary_cross_entropy_with_logits(
            predictor.logits(x), y.float(), pos_weight=pos_weight, reduction="sum"
        )
        total += float(loss)
    return total / max(1, len(data) * data.m)


def fit_predictor(
    train: LabeledTokens,
    validation: LabeledTokens,
    rank: int,
    *,
    hidden_activation: str | None = None,
    epochs: int = DEFAULT_EPOCHS,
    lr: float = DEFAULT_LR,
    batch_size: int = DEFAULT_BATCH_SIZE,
    seed: int = 0,
    chunk: int = 4096,
    progress: bool = True,
    desc: str = "predictor",
) -> tuple[LowRankPredictor, float, int]:
    """Weighted-BCE fit on ``train``; returns (predictor with the lowest-validation-loss epoch's weights,
    pos_weight, that epoch (1-based))."""
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    if len(train) == 0 or len(validation) == 0:
        raise ValueError("the train and validation splits must both contain tokens")
    device = train.x.device
    gen = torch.Generator().manual_seed(seed)
    predictor = LowRankPredictor(train.x.shape[1], train.m, rank, hidden_activation)
    predictor.reset_parameters(gen)
    predictor.to(device)
    rate = _positive_rate(train, chunk)
    # negatives / positives, clamped so that a layer with (almost) no active neurons gets a finite weight
    pw = (1.0 - rate) / rate if rate > 0 else 1.0
    pw = min(max(pw, 1e-3), 1e4)
    pos_weight = torch.tensor(pw, device=device)
    opt = torch.optim.Adam(predictor.parameters(), lr=lr)
    best_loss, best_epoch, best_state = math.inf, 0, None
    # Training needs autograd even when called under no_grad (e.g. from inside a capture generator).
    with torch.enable_grad():
        for epoch in tqdm(range(1, epochs + 1), desc=desc, leave=False, disable=not progress):
            predictor.train()
            order = torch.randperm(len(train), generator=gen).to(device)
            for x, y in train.batches(batch_size, order):
                loss = F.binary_cross_entropy_with_logits(
                    predictor.logits(x), y.float(), pos_weight=pos_weight
                )
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            predictor.eval()
            val_loss = _mean_loss(predictor, validation, pos_weight, chunk)
            if val_loss < best_loss:
                best_loss, best_epoch = val_loss, epoch
                best_state = {k: v.detach().clone() for k, v in predictor.state_dict().items()}
    assert best_state is not None
    predictor.load_state_dict(best_state)
    return predictor.eval(), pw, best_epoch


@torch.no_grad()
def choose_score_threshold(
    predictor: LowRankPredictor, validation: LabeledTokens, recall_target: float, chunk: int = 4096
) -> float:
    """The largest score threshold t with recall(score ≥ t) ≥ ``recall_target`` on ``validation``: the k-th
    highest score among the truly active pairs, k = ceil(target · #active). 0.5 when nothing is active."""
    validate_recall_target(recall_target)
    positives = [predictor.probabilities(x)[y] for x, y in validation.batches(chunk)]
    scores = torch.cat(positives) if positives else torch.zeros(0)
    p = scores.numel()
    if p == 0:
        return 0.5  # the paper's default rule; recall is vacuous here
    k = max(1, math.ceil(recall_target * p - 1e-9))  # the -1e-9 keeps 0.99·100 from rounding up to 100
    return float(scores.float().kthvalue(p - k + 1).values)  # the k-th largest


@dataclass
class Counts:
    """Confusion counts over (token, neuron) pairs."""

    true_positive: int = 0
    false_positive: int = 0
    false_negative: int = 0
    pairs: int = 0

    @property
    def recall(self) -> float:  # vacuously 1 when nothing is active
        active = self.true_positive + self.false_negative
        return self.true_positive / active if active else 1.0

    @property
    def precision(self) -> float:  # vacuously 1 when nothing is predicted active
        predicted = self.true_positive + self.false_positive
        return self.true_positive / predicted if predicted else 1.0

    @property
    def predicted_sparsity(self) -> float:
        return 1.0 - (self.true_positive + self.false_positive) / self.pairs if self.pairs else 0.0

    @property
    def true_sparsity(self) -> float:
        return 1.0 - (self.true_positive + self.false_negative) / self.pairs if self.pairs else 0.0


@torch.no_grad()
def evaluate(predictor: LowRankPredictor, data: LabeledTokens, threshold: float, chunk: int = 4096) -> Counts:
    c = Counts()
    for x, y in data.batches(chunk):
        pred = predictor.predict(x, threshold)  # (B, m)
        c.true_positive += int((pred & y).sum())
        c.false_positive += int((pred & ~y).sum())
        c.false_negative += int((~pred & y).sum())
        c.pairs += y.numel()
    return c


def train_predictors(
    model: nn.Module,
    sequences: torch.Tensor,
    thresholds: torch.Tensor,
    rank: int | None = None,
    recall_target: float = 0.99,
    epochs: int = DEFAULT_EPOCHS,
    lr: float = DEFAULT_LR,
    batch_size: int = DEFAULT_BATCH_SIZE,
    split: Sequence[float] = (0.8, 0.1, 0.1),
    seed: int = 0,
    hidden_activation: str | None = None,
    chunk: int = 4096,
    progress: bool = True,
) -> PredictorSet:
    """One predictor per layer of ``model`` from token ``sequences`` (N_seq, T) and calibrated ε
    ``thresholds`` (L,); every figure in the returned report is measured on the held-out test sequences."""
    from sparseinfer.sparsity.capture import layerwise_ffn_inputs
    from sparseinfer.sparsity.neurons import output_norms

    validate_rank(rank)
    validate_recall_target(recall_target)
    num_layers = len(model.layers)
    if thresholds.shape != (num_layers,):
        raise ValueError(
            f"thresholds must have shape ({num_layers},) (one ε per layer), got {tuple(thresholds.shape)}"
        )
    if sequences.ndim != 2:
        raise ValueError(f"sequences must be (N_seq, T) token ids, got shape {tuple(sequences.shape)}")
    split_idx = split_sequences(sequences.shape[0], split, seed)
    streams = [
        layerwise_ffn_inputs(model, sequences[split_idx[name]], progress=False) for name in SPLIT_NAMES
    ]

    predictors: list[LowRankPredictor] = []
    reports: list[LayerReport] = []
    score_thresholds = torch.zeros(num_layers)
    layers = tqdm(
        zip(*streams, strict=True), total=num_layers, desc="train-predictor layers", disable=not progress
    )
    for (layer, x_tr), (l_va, x_va), (l_te, x_te) in layers:
        assert layer == l_va == l_te, "the three split streams must advance layer by layer together"
        ffn = model.layers[layer].mlp
        norms, eps = output_norms(ffn), float(thresholds[layer])
        m = norms.numel()
        data = {
            name: LabeledTokens(x, layer_labels(ffn, x, norms, eps, chunk), m)
            for name, x in zip(SPLIT_NAMES, (x_tr, x_va, x_te), strict=True)
        }
        d, ffn_params = x_tr.shape[1], ffn_parameter_count(ffn)
        r = rank if rank is not None else default_rank(d, m, ffn_params)
        predictor, pw, best_epoch = fit_predictor(
            data["train"],
            data["validation"],
            r,
            hidden_activation=hidden_activation,
            epochs=epochs,
            lr=lr,
            batch_size=batch_size,
            seed=seed + layer,
            chunk=chunk,
            progress=progress,
            desc=f"layer {layer} epochs",
        )
        t = choose_score_threshold(predictor, data["validation"], recall_target, chunk)
        val = evaluate(predictor, data["validation"], t, chunk)
        test = evaluate(predictor, data["test"], t, chunk)
        score_thresholds[layer] = t
        predictors.append(predictor)
        reports.append(
            LayerReport(
                layer=layer,
                rank=r,
                size_percent=size_percent(d, m, r, ffn_params),
                score_threshold=t,
                recall=test.recall,
                precision=test.precision,
                predicted_sparsity=test.predicted_sparsity,
                true_sparsity=test.true_sparsity,
                validation_recall=val.recall,
                pos_weight=pw,
                best_epoch=best_epoch,
                train_tokens=len(data["train"]),
                validation_tokens=len(data["validation"]),
                test_tokens=len(data["test"]),
            )
        )
        # free this layer's activations and labels before the streams compute the next layer
        del data, x_tr, x_va, x_te
    settings = {
        "epochs": epochs,
        "lr": lr,
        "batch_size": batch_size,
        "split": list(split),
        "seed": seed,
        "loss": "BCE with pos_weight = negatives / positives (train tokens, per layer)",
        "recall": "pooled over (token, neuron) pairs",
    }
    return PredictorSet(predictors, score_thresholds, recall_target, reports, split_idx, settings)
