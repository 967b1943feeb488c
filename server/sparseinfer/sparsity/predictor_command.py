"""``sparseinfer train-predictor MODEL --text FILE``: train one activation predictor per layer against the
calibrated thresholds in the sidecar, write the sidecar's predictor section, print the held-out figures.

A thin layer: flags -> ``TrainPredictorConfig`` -> ``predictor_train.train_predictors`` ->
``PredictorSet.save``.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from sparseinfer.sparsity.predictor import PredictorSet, validate_rank, validate_recall_target
from sparseinfer.sparsity.predictor_train import DEFAULT_BATCH_SIZE, DEFAULT_EPOCHS, DEFAULT_LR

# The text is cut into sequences that are split 80/10/10 by sequence; at least this many sequences so that
# validation and test each get at least one (shorter sequences are used when the text is short).
MIN_SEQUENCES = 20


@dataclass(frozen=True)
class TrainPredictorConfig:
    model: Path
    text: Path
    tokens: int | None
    seq_len: int
    rank: int | None  # None: ~6% of the FFN's parameters
    recall: float
    epochs: int
    lr: float
    batch_size: int
    seed: int
    hidden_activation: str | None
    sidecar: Path | None

    def validate(self) -> None:
        validate_rank(self.rank)
        validate_recall_target(self.recall)
        for name, value in (
            ("--epochs", self.epochs),
            ("--batch-size", self.batch_size),
            ("--seq-len", self.seq_len),
        ):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if not self.lr > 0:
            raise ValueError(f"--lr must be > 0, got {self.lr}")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train-predictor",
        help="train per-layer activation predictors on the calibrated thresholds (run `calibrate` first)",
    )
    p.add_argument(
        "model", type=Path, metavar="MODEL", help="checkpoint directory (with a calibrated sparsity sidecar)"
    )
    p.add_argument(
        "--text",
        type=Path,
        required=True,
        metavar="FILE",
        help="training text (UTF-8), split by sequence 80/10/10",
    )
    p.add_argument(
        "--tokens", type=int, default=None, metavar="N", help="use at most this many tokens of the text"
    )
    p.add_argument("--seq-len", type=int, default=512, help="tokens per sequence (shortened for short texts)")
    p.add_argument(
        "--rank",
        type=int,
        default=None,
        metavar="R",
        help="predictor rank r (default: ~6%% of the FFN's size)",
    )
    p.add_argument(
        "--recall", type=float, default=0.99, help="target recall in (0, 1], met on validation tokens"
    )
    p.add_argument("--epochs", type=int, default=DEFAULT_EPOCHS)
    p.add_argument("--lr", type=float, default=DEFAULT_LR, help="Adam learning rate")
    p.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE, help="tokens per training step")
    p.add_argument("--seed", type=int, default=0, help="seeds the split, the initialisation and the batches")
    p.add_argument(
        "--hidden-activation",
        choices=("none", "relu"),
        default="none",
        help="between W1 and W2: none (the paper) or relu (PowerInfer)",
    )
    p.add_argument(
        "--sidecar",
        type=Path,
        default=None,
        metavar="DIR",
        help="sidecar directory (default: the checkpoint's)",
    )
    p.set_defaults(run=_run)


def config_from_args(args: argparse.Namespace) -> TrainPredictorConfig:
    config = TrainPredictorConfig(
        model=args.model,
        text=args.text,
        tokens=args.tokens,
        seq_len=args.seq_len,
        rank=args.rank,
        recall=args.recall,
        epochs=args.epochs,
        lr=args.lr,
        batch_size=args.batch_size,
        seed=args.seed,
        hidden_activation=None if args.hidden_activation == "none" else args.hidden_activation,
        sidecar=args.sidecar,
    )
    config.validate()
    return config


def run_train_predictor(config: TrainPredictorConfig, out: TextIO) -> PredictorSet:
    from sparseinfer.model import load_model, load_tokenizer
    from sparseinfer.sparsity.data import read_text, tokens_to_sequences
    from sparseinfer.sparsity.predictor_train import train_predictors
    from sparseinfer.sparsity.sidecar import Sidecar

    if not config.model.is_dir():
        raise ValueError(f"MODEL {config.model}: not a directory")
    # Check the calibration before any expensive work: the labels are defined by its thresholds.
    sidecar = Sidecar.load(config.model, sidecar_dir=config.sidecar)
    sidecar.require("calibration")
    thresholds = sidecar.thresholds.float()

    tokenizer = load_tokenizer(config.model)
    ids = tokenizer.encode(read_text(config.text))
    available = len(ids) if config.tokens is None else min(len(ids), config.tokens)
    seq_len = max(1, min(config.seq_len, available // MIN_SEQUENCES))
    sequences = tokens_to_sequences(ids, config.tokens, seq_len, source=f"--text {config.text}")
    model = load_model(config.model).eval()
    if thresholds.numel() != len(model.layers):
        raise ValueError(
            f"the sidecar's calibration has {thresholds.numel()} thresholds, "
            f"the model has {len(model.layers)} layers"
        )
    predictors = train_predictors(
        model,
        sequences,
        thresholds,
        rank=config.rank,
        recall_target=config.recall,
        epochs=config.epochs,
        lr=config.lr,
        batch_size=config.batch_size,
        seed=config.seed,
        hidden_activation=config.hidden_activation,
    )
    directory = predictors.save(config.model, sidecar_dir=config.sidecar)
    out.write(format_report(predictors))
    out.write(f"wrote the predictor section to {directory}\n")
    return predictors


def format_report(predictors: PredictorSet) -> str:
    """The per-layer table; every figure but size and threshold is measured on the held-out test tokens."""
    r0 = predictors.reports[0]
    lines = [
        f"Predictor figures on HELD-OUT TEST tokens ({r0.test_tokens} tokens in "
        f"{len(predictors.split['test'])} sequence(s) unused in training and "
        f"in choosing the threshold); score threshold chosen on "
        f"{r0.validation_tokens} validation tokens for recall >= {predictors.recall_target:g}; "
        f"trained on {r0.train_tokens} tokens.",
        "",
        "| layer | rank | size % of FFN | score threshold | recall | precision | predicted sparsity "
        "| true sparsity |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in predictors.reports:
        lines.append(
            f"| {r.layer} | {r.rank} | {r.size_percent:.2f} | {r.score_threshold:.4f} | {r.recall:.4f} | "
            f"{r.precision:.4f} | {r.predicted_sparsity:.4f} | {r.true_sparsity:.4f} |"
        )
    n = len(predictors.reports)
    mean = {
        k: sum(getattr(r, k) for r in predictors.reports) / n
        for k in ("recall", "precision", "predicted_sparsity")
    }
    lines.append(
        f"| mean | | | | {mean['recall']:.4f} | {mean['precision']:.4f} | "
        f"{mean['predicted_sparsity']:.4f} | |"
    )
    return "\n".join(lines) + "\n"


def _run(args: argparse.Namespace, env: object) -> None:
    run_train_predictor(config_from_args(args), sys.stdout)
