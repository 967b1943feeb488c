"""The sidecar: round trip, sections and their dependencies, fingerprint mismatch, missing-sidecar errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from sparseinfer.model.random_checkpoint import write_random_checkpoint
from sparseinfer.sparsity.sidecar import MANIFEST_FILE, TENSORS_FILE, Sidecar, SidecarError, model_fingerprint


def _fill(sidecar: Sidecar) -> None:
    sidecar.set_section("calibration", {"thresholds": torch.tensor([0.1, 0.2])}, {"cett_target": 0.2})
    sidecar.set_section("profile", {"profile.frequency": torch.rand(2, 256)}, {"skew": [1, 2]})
    sidecar.set_section(
        "predictor",
        {"predictor.0.w1": torch.randn(4, 64), "predictor.score_threshold": torch.tensor([0.5, 0.4])},
        {"rank": 4},
    )


def test_round_trip(fresh_checkpoint: Path) -> None:
    sidecar = Sidecar.open(fresh_checkpoint)
    assert not sidecar.has("calibration")
    _fill(sidecar)
    sidecar.save()
    assert (fresh_checkpoint / TENSORS_FILE).is_file() and (fresh_checkpoint / MANIFEST_FILE).is_file()
    back = Sidecar.load(fresh_checkpoint)
    assert back.sections == sidecar.sections
    assert back.tensors.keys() == sidecar.tensors.keys()
    for name, t in sidecar.tensors.items():
        torch.testing.assert_close(back.tensors[name], t)
    torch.testing.assert_close(back.thresholds, torch.tensor([0.1, 0.2]))
    assert set(back.section_tensors("predictor")) == {"predictor.0.w1", "predictor.score_threshold"}
    manifest = json.loads((fresh_checkpoint / MANIFEST_FILE).read_text())
    assert manifest["model_fingerprint"] == model_fingerprint(fresh_checkpoint)


def test_recalibrating_drops_profile_and_predictor(fresh_checkpoint: Path) -> None:
    sidecar = Sidecar.open(fresh_checkpoint)
    _fill(sidecar)
    sidecar.set_section("calibration", {"thresholds": torch.tensor([0.3, 0.4])}, {"cett_target": 0.1})
    assert set(sidecar.sections) == {"calibration"}
    assert set(sidecar.tensors) == {"thresholds"}
    sidecar.save()
    assert set(load_file(str(fresh_checkpoint / TENSORS_FILE))) == {"thresholds"}


def test_missing_sidecar_and_missing_section_name_the_command(fresh_checkpoint: Path) -> None:
    with pytest.raises(SidecarError, match=r"no sparsity sidecar.*run `sparseinfer calibrate"):
        Sidecar.load(fresh_checkpoint)
    sidecar = Sidecar.open(fresh_checkpoint)
    with pytest.raises(SidecarError, match=r"no calibration section; run `sparseinfer calibrate"):
        sidecar.require("calibration")
    with pytest.raises(SidecarError, match=r"no predictor section; run `sparseinfer train-predictor"):
        sidecar.require("predictor")
    with pytest.raises(ValueError, match="does not belong to section"):
        sidecar.set_section("profile", {"thresholds": torch.zeros(2)}, {})


def test_sidecar_from_another_model_is_rejected(fresh_checkpoint: Path, tmp_path: Path) -> None:
    sidecar = Sidecar.open(fresh_checkpoint)
    _fill(sidecar)
    sidecar.save()
    other = write_random_checkpoint(tmp_path / "other", seed=99)  # same shapes, other weights
    for name in (TENSORS_FILE, MANIFEST_FILE):
        shutil.copy(fresh_checkpoint / name, other / name)
    with pytest.raises(SidecarError, match="written for another model"):
        Sidecar.load(other)
    with pytest.raises(SidecarError, match="written for another model"):
        Sidecar.open(other)


def test_fingerprint_sees_weights_and_config_but_not_the_sidecar(fresh_checkpoint: Path) -> None:
    before = model_fingerprint(fresh_checkpoint)
    Sidecar.open(fresh_checkpoint).save()  # the sidecar's own safetensors file is not part of the model
    assert model_fingerprint(fresh_checkpoint) == before
    weights = fresh_checkpoint / "model.safetensors"
    tensors = load_file(str(weights))
    tensors["model.layers.1.mlp.down_proj.weight"][0, 0] += 1.0  # one weight of 1.4M, at a sampled offset
    save_file(tensors, str(weights), metadata={"format": "pt"})
    changed = model_fingerprint(fresh_checkpoint)
    assert changed != before
    config = json.loads((fresh_checkpoint / "config.json").read_text())
    config["rms_norm_eps"] = 1e-5
    (fresh_checkpoint / "config.json").write_text(json.dumps(config))
    assert model_fingerprint(fresh_checkpoint) != changed


def test_sidecar_dir_elsewhere(fresh_checkpoint: Path, tmp_path: Path) -> None:
    elsewhere = tmp_path / "side"
    sidecar = Sidecar.open(fresh_checkpoint, sidecar_dir=elsewhere)
    _fill(sidecar)
    sidecar.save()
    assert not (fresh_checkpoint / MANIFEST_FILE).exists()
    assert Sidecar.load(fresh_checkpoint, sidecar_dir=elsewhere).has("predictor")
