"""Neuron frequencies and skew statistics against a direct count over the captured FFN inputs."""

from __future__ import annotations

import math

import pytest
import torch

from sparseinfer.sparsity.calibrate import calibrate
from sparseinfer.sparsity.capture import layerwise_ffn_inputs
from sparseinfer.sparsity.profile import Profile, profile, top_share


def test_top_share_known_values() -> None:
    freq = torch.tensor([0.5, 0.0, 0.25, 0.25, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0])
    assert top_share(freq, 0.1) == pytest.approx(0.5)  # the top 1 of 10
    assert top_share(freq, 0.2) == pytest.approx(0.75)  # top 2
    assert top_share(freq, 0.5) == pytest.approx(1.0)
    assert top_share(torch.full((7,), 0.3), 0.2) == pytest.approx(2 / 7)  # ⌈1.4⌉ = 2 of 7 equal neurons
    assert math.isnan(top_share(torch.zeros(5), 0.5))


def test_profile_counts_active_tokens(tiny_model, calibration_sequences) -> None:
    seqs = calibration_sequences[:6]
    cal = calibrate(tiny_model, seqs, 0.2, num_candidates=100, progress=False)
    prof = profile(tiny_model, seqs, cal.thresholds, chunk=50, progress=False)
    L, m = len(tiny_model.layers), tiny_model.config.intermediate_size
    assert prof.frequency.shape == (L, m) and prof.num_tokens == seqs.numel()
    for li, x in layerwise_ffn_inputs(tiny_model, seqs, progress=False):
        ffn = tiny_model.layers[li].mlp
        h = ffn.neuron_activations(x)
        w = ffn.down_proj.weight
        expected = torch.zeros(m)
        for i in range(m):  # neuron by neuron: tokens with ‖h_i·W_out[:, i]‖ ≥ ε
            n_norm = h[:, i].abs() * torch.linalg.vector_norm(w[:, i])
            expected[i] = float((n_norm >= cal.thresholds[li]).float().mean())
        torch.testing.assert_close(prof.frequency[li], expected, atol=1.5 / x.shape[0], rtol=0)
        # the average frequency is one minus the calibrated sparsity
        assert float(prof.frequency[li].mean()) == pytest.approx(1 - cal.sparsity_per_layer[li], abs=1e-3)
    skew = prof.skew()
    for row in skew:
        assert 0.1 <= row["top10"] <= row["top20"] <= row["top50"] <= 1.0
    manifest = prof.manifest("abc")
    assert manifest["model"]["top20"] == pytest.approx(sum(r["top20"] for r in skew) / L)
    with pytest.raises(ValueError, match="thresholds has 1 entries"):
        profile(tiny_model, seqs, torch.zeros(1), progress=False)


def test_never_active_layer_is_null_in_manifest() -> None:
    prof = Profile(frequency=torch.stack([torch.zeros(4), torch.tensor([1.0, 0.0, 0.0, 0.0])]), num_tokens=3)
    manifest = prof.manifest()
    assert manifest["layers"][0]["top10"] is None and manifest["layers"][1]["top10"] == 1.0
    assert manifest["model"]["top50"] == 1.0 and manifest["layers"][0]["never_active"] == 1.0


def test_profile_cli_requires_calibration_then_writes_profile(
    fresh_checkpoint, calibration_text, capsys
) -> None:
    from sparseinfer.cli import main
    from sparseinfer.sparsity.sidecar import Sidecar

    base = [str(fresh_checkpoint), "--text", str(calibration_text), "--tokens", "512", "--seq-len", "64"]
    assert main(["profile", *base]) == 2
    assert "run `sparseinfer calibrate" in capsys.readouterr().err
    assert main(["calibrate", *base, "--cett", "0.2", "--candidates", "50"]) == 0
    capsys.readouterr()
    assert main(["profile", *base]) == 0
    out = capsys.readouterr().out
    sidecar = Sidecar.load(fresh_checkpoint)
    freq = sidecar.section_tensors("profile")["profile.frequency"]
    assert freq.shape == (2, 256)
    manifest = sidecar.require("profile")
    assert manifest["num_tokens"] == 512
    assert f"| 0 | {100 * manifest['layers'][0]['top10']:.1f}% |" in out
    # re-calibrating invalidates the profile
    assert main(["calibrate", *base, "--cett", "0.1", "--candidates", "50"]) == 0
    assert not Sidecar.load(fresh_checkpoint).has("profile")
