"""Fixtures of the sparse-execution tests.

- ``calibrated_checkpoint -> Path`` (session): a tiny random non-gated ReLU² checkpoint (hidden 64, 2 layers,
  256 neurons) with a full sparsity sidecar written by the real toolkit: calibration (CETT 0.2), profile and
  low-rank predictors (rank 8, 2 epochs), all on 2048 tokens of seeded random ids.
- ``calibration_only_checkpoint -> Path`` (session): the same model with only the calibration section.
- ``load_calibrated`` : ``load_calibrated(path) -> Transformer`` (fp32, a fresh copy each call: installing
  executors replaces the model's FFNs).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from sparseinfer.model import load_model
from sparseinfer.model.random_checkpoint import write_random_checkpoint
from sparseinfer.sparsity.sidecar import Sidecar


def _sequences(vocab: int, n: int = 32, T: int = 64, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(2, vocab, (n, T), generator=g)


def _write_sidecar(path: Path, with_profile_and_predictor: bool) -> None:
    from sparseinfer.sparsity.calibrate import calibrate
    from sparseinfer.sparsity.predictor_train import train_predictors
    from sparseinfer.sparsity.profile import profile

    model = load_model(path, dtype=torch.float32)
    seqs = _sequences(model.config.vocab_size)
    sidecar = Sidecar.open(path)
    cal = calibrate(model, seqs, 0.2, progress=False)
    sidecar.set_section("calibration", cal.tensors(), cal.manifest())
    if with_profile_and_predictor:
        prof = profile(model, seqs, cal.thresholds, progress=False)
        sidecar.set_section("profile", prof.tensors(), prof.manifest())
        preds = train_predictors(model, seqs, cal.thresholds, rank=8, epochs=2, progress=False)
        sidecar.set_section("predictor", preds.state_tensors(), preds.manifest())
    sidecar.save()


@pytest.fixture(scope="session")
def calibrated_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = write_random_checkpoint(tmp_path_factory.mktemp("calibrated"), intermediate=256, seed=3, std=0.2)
    _write_sidecar(path, with_profile_and_predictor=True)
    return path


@pytest.fixture(scope="session")
def calibration_only_checkpoint(
    tmp_path_factory: pytest.TempPathFactory, calibrated_checkpoint: Path
) -> Path:
    path = tmp_path_factory.mktemp("calibration_only") / "ckpt"
    shutil.copytree(calibrated_checkpoint, path, ignore=shutil.ignore_patterns("sparsity.*"))
    _write_sidecar(path, with_profile_and_predictor=False)
    return path


@pytest.fixture
def load_calibrated():
    def load(path: Path):
        return load_model(path, dtype=torch.float32).eval()

    return load
