"""CETT calibration against brute-force oracles: per-token python loops over neurons (PAPER.md's formula with
the vectors n_i(x) = h_i(x)·W_out[:, i] built one by one), and a full scan of every candidate threshold."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from sparseinfer.sparsity.calibrate import (
    binary_search,
    calibrate,
    calibrate_layer,
    candidate_thresholds,
    mean_cett,
    token_cett,
    validate_cett_target,
)
from sparseinfer.sparsity.capture import layerwise_ffn_inputs


def magnitudes(h: torch.Tensor, w_out: torch.Tensor) -> torch.Tensor:
    """‖n_i(x)‖ via PAPER.md's identity |h_i|·‖W_out[:, i]‖ in float32: the thresholds are float32 values of
    exactly this product, so membership of D at a tie (ε equal to a magnitude) must be decided the same way;
    test_neurons checks the identity against the float64 norm of the vector n_i."""
    return h.float().abs() * torch.linalg.vector_norm(w_out.float(), dim=0)


def brute_token_cett(h: torch.Tensor, w_out: torch.Tensor, eps: float) -> list[float]:
    """PAPER.md literally: D = {i : ‖n_i‖ < ε}, CETT = ‖Σ_D n_i‖ / ‖Σ_i n_i‖ (0 when the output is 0)."""
    mag = magnitudes(h, w_out)
    h, w = h.double(), w_out.double()
    out = []
    for t in range(h.shape[0]):
        full = torch.zeros(w.shape[0], dtype=torch.float64)
        dropped = torch.zeros(w.shape[0], dtype=torch.float64)
        for i in range(h.shape[1]):
            n_i = h[t, i] * w[:, i]
            full += n_i
            if float(mag[t, i]) < eps:
                dropped += n_i
        den = float(torch.linalg.vector_norm(full))
        out.append(float(torch.linalg.vector_norm(dropped)) / den if den > 0 else 0.0)
    return out


def brute_mean(h: torch.Tensor, w_out: torch.Tensor, eps: float) -> tuple[float, float]:
    cett = brute_token_cett(h, w_out, eps)
    mag = magnitudes(h, w_out)
    inactive = sum(1 for t in range(h.shape[0]) for i in range(h.shape[1]) if float(mag[t, i]) < eps)
    return sum(cett) / len(cett), inactive / h.numel()


class FixedFFN(nn.Module):
    """A stand-in FFN whose input *is* h: neuron_activations(x) = x, so tests choose h directly."""

    def __init__(self, w_out: torch.Tensor) -> None:
        super().__init__()
        self.down_proj = nn.Linear(w_out.shape[1], w_out.shape[0], bias=False)
        with torch.no_grad():
            self.down_proj.weight.copy_(w_out)

    def neuron_activations(self, x: torch.Tensor) -> torch.Tensor:
        return x


def _random_layer(
    seed: int, n: int, m: int, d: int, nonneg: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    h = torch.relu(torch.randn(n, m, generator=g)) ** 2  # relu²-like: many exact zeros
    w = torch.randn(d, m, generator=g)
    if nonneg:
        w = w.abs()
    else:
        h = h * torch.sign(torch.randn(n, m, generator=g))  # signed h (gated FFNs)
    return h, w


def test_token_and_mean_cett_match_brute_force() -> None:
    h, w = _random_layer(0, n=7, m=12, d=5)
    norms = torch.linalg.vector_norm(w, dim=0)
    mags = (h.abs() * norms).flatten().sort().values
    for eps in [0.0, float(mags[40]), float(mags[60]), float(mags[-1]), float(mags[-1]) + 1]:
        expected = brute_token_cett(h, w, eps)
        torch.testing.assert_close(token_cett(h, w, norms, eps), torch.tensor(expected, dtype=torch.float32))
        cett, sparsity = mean_cett(h, w, eps, chunk=3)  # chunk 3: the seams between chunks are exercised
        b_cett, b_sparsity = brute_mean(h, w, eps)
        assert cett == pytest.approx(b_cett, rel=1e-5, abs=1e-7)
        assert sparsity == pytest.approx(b_sparsity)
    assert mean_cett(h, w, float(mags[-1]) + 1)[0] == pytest.approx(1.0)  # every neuron dropped


def test_zero_output_token_has_cett_zero() -> None:
    h = torch.zeros(2, 4)
    h[1] = torch.tensor([1.0, 0.5, 0.0, 2.0])
    w = torch.randn(3, 4)
    assert token_cett(h, w, torch.linalg.vector_norm(w, dim=0), 10.0).tolist()[0] == 0.0


def test_candidates_are_exact_quantiles_plus_zero() -> None:
    sample = torch.tensor([5.0, 1.0, 3.0, 2.0, 4.0, 0.5])
    cands = candidate_thresholds(sample, num_candidates=6)
    ordered = sorted(sample.tolist())
    expected = sorted({0.0, *[ordered[round(k / 5 * 5)] for k in range(6)]})
    assert cands.tolist() == expected
    assert candidate_thresholds(sample, 2).tolist() == [0.0, 0.5, 5.0]


def test_binary_search_finds_the_boundary() -> None:
    values = [0.0, 0.1, 0.15, 0.3, 0.2, 0.5]  # not monotone at index 3→4
    assert binary_search(lambda k: values[k], len(values), 0.16) == 2
    assert binary_search(lambda k: values[k], len(values), 0.9) == 5
    assert binary_search(lambda k: values[k], len(values), 0.05) == 0


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    n=st.integers(1, 6),
    m=st.integers(2, 9),
    d=st.integers(1, 4),
    target=st.floats(0.01, 0.99),
    nonneg=st.booleans(),
)
def test_calibrated_eps_is_the_largest_feasible_candidate(
    seed: int, n: int, m: int, d: int, target: float, nonneg: bool
) -> None:
    h, w = _random_layer(seed, n, m, d, nonneg)
    layer = calibrate_layer(FixedFFN(w), h, target, num_candidates=50)
    cands = layer.candidates.tolist()
    # The candidates: 0 and the exact quantiles of all n·m magnitudes (no subsampling at this size).
    mags = sorted((h.abs() * torch.linalg.vector_norm(w, dim=0)).flatten().tolist())
    expected = sorted({0.0, *[mags[round(k / 49 * (len(mags) - 1))] for k in range(50)]})
    assert cands == pytest.approx(expected)
    brute = [brute_mean(h, w, c)[0] for c in cands]
    k = cands.index(layer.threshold)
    assert brute[k] <= target + 1e-6
    assert k == len(cands) - 1 or brute[k + 1] > target - 1e-6  # the boundary property, always
    if all(a <= b + 1e-9 for a, b in itertools.pairwise(brute)):
        assert k == max(j for j, c in enumerate(brute) if c <= target + 1e-6)  # monotone: the largest one
    b_cett, b_sparsity = brute_mean(h, w, layer.threshold)
    assert layer.cett == pytest.approx(b_cett, rel=1e-5, abs=1e-6)
    assert layer.sparsity == pytest.approx(b_sparsity)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000), n=st.integers(1, 5), m=st.integers(2, 10), d=st.integers(1, 4))
def test_cett_is_monotone_in_eps_when_outputs_share_an_orthant(seed: int, n: int, m: int, d: int) -> None:
    # h ≥ 0 (ReLU²) and W_out ≥ 0: every n_i lies in the positive orthant, so adding a neuron to D can only
    # grow ‖Σ_D n_i‖ (and the calibrated ε is then exactly the largest feasible candidate).
    h, w = _random_layer(seed, n, m, d, nonneg=True)
    mags = sorted(set((h.abs() * torch.linalg.vector_norm(w, dim=0)).flatten().tolist()))
    grid = [0.0, *mags, mags[-1] + 1.0]
    values = [mean_cett(h, w, e)[0] for e in grid]
    for a, b in itertools.pairwise(values):
        assert b >= a - 1e-6
    live = float((h.abs().sum(dim=1) > 0).float().mean())  # tokens with all h = 0 have CETT 0 at any ε
    assert values[0] == 0.0 and values[-1] == pytest.approx(live)


def test_cett_is_not_monotone_in_general() -> None:
    # Documented limitation of the binary search (calibrate.py docstring): two opposite neurons cancel.
    w = torch.tensor([[1.0, -1.0, 0.2]])  # d = 1
    h = torch.tensor([[1.0, 1.1, 1.0]])
    # ε in (1.0, 1.1]: D = {0}, dropped = 1; ε above 1.1: D = {0, 1}, dropped = -0.1; FFN = 0.1
    assert mean_cett(h, w, 1.05)[0] > mean_cett(h, w, 1.2)[0]


def test_subsampled_quantiles_and_recomputed_h_keep_the_guarantee() -> None:
    h, w = _random_layer(3, n=40, m=30, d=6)
    full = calibrate_layer(FixedFFN(w), h, 0.2, num_candidates=100)
    recomputed = calibrate_layer(FixedFFN(w), h, 0.2, num_candidates=100, h_cache_bytes=0, chunk=7)
    assert recomputed.threshold == full.threshold and recomputed.cett == pytest.approx(full.cett)
    sub = calibrate_layer(FixedFFN(w), h, 0.2, num_candidates=100, max_quantile_samples=300)
    assert set(sub.candidates.tolist()) <= set([0.0, *(h.abs() * w.norm(dim=0)).flatten().tolist()])
    cands = sub.candidates.tolist()
    assert brute_mean(h, w, sub.threshold)[0] <= 0.2 + 1e-6
    if sub.index + 1 < len(cands):
        assert brute_mean(h, w, cands[sub.index + 1])[0] > 0.2 - 1e-6


@pytest.mark.parametrize("bad", [0.0, 1.0, -0.1, 1.5, math.nan, "abc", None])
def test_cett_outside_unit_interval_is_rejected(bad: object, tiny_model, calibration_sequences) -> None:
    with pytest.raises(ValueError, match=r"cett must be"):
        validate_cett_target(bad)  # type: ignore[arg-type]
    if isinstance(bad, float):
        with pytest.raises(ValueError, match=r"cett must be in \(0, 1\)"):
            calibrate(tiny_model, calibration_sequences[:2], bad, progress=False)


@pytest.mark.parametrize("target", [0.05, 0.2, 0.5])
def test_calibrate_tiny_model_per_layer(tiny_model, calibration_sequences, target: float) -> None:
    seqs = calibration_sequences[:8]
    cal = calibrate(tiny_model, seqs, target, num_candidates=200, chunk=100, progress=False)
    L = len(tiny_model.layers)
    assert cal.thresholds.shape == (L,) and cal.thresholds.dtype == torch.float32
    assert cal.num_tokens == seqs.numel() and len(cal.cett_per_layer) == L
    for li, x in layerwise_ffn_inputs(tiny_model, seqs, progress=False):
        ffn = tiny_model.layers[li].mlp
        h = ffn.neuron_activations(x)
        eps = float(cal.thresholds[li])
        c, s = mean_cett(h, ffn.down_proj.weight, eps)
        assert c == pytest.approx(cal.cett_per_layer[li], rel=1e-4, abs=1e-6)
        assert s == pytest.approx(cal.sparsity_per_layer[li], rel=1e-6)
        assert c <= target
        assert 0.0 < s < 1.0  # a random relu² layer is sparse at any of these targets, never fully
    # a looser target never yields a denser model
    if target < 0.5:
        looser = calibrate(tiny_model, seqs, 0.5, num_candidates=200, progress=False)
        assert looser.sparsity >= cal.sparsity


# ---- the CLI ----


def test_calibrate_cli_writes_sidecar_and_table(fresh_checkpoint, calibration_text, capsys) -> None:
    from sparseinfer.cli import main
    from sparseinfer.sparsity.data import text_sha256
    from sparseinfer.sparsity.sidecar import Sidecar

    argv = ["calibrate", str(fresh_checkpoint), "--cett", "0.2", "--text", str(calibration_text)]
    assert main([*argv, "--tokens", "1024", "--seq-len", "64", "--candidates", "100"]) == 0
    out = capsys.readouterr().out
    sidecar = Sidecar.load(fresh_checkpoint)
    section = sidecar.require("calibration")
    assert section["cett_target"] == 0.2 and section["num_tokens"] == 1024
    assert section["text_sha256"] == text_sha256(calibration_text)
    assert sidecar.thresholds.shape == (2,)
    for row in section["layers"]:
        assert row["cett"] <= 0.2
        assert f"| {row['layer']} | {100 * row['sparsity']:.2f}% | {row['cett']:.4f} |" in out


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--cett", "1.5"], r"cett must be in \(0, 1\)"),
        (["--cett", "0"], r"cett must be in \(0, 1\)"),
        (["--tokens", "10"], "--tokens must be ≥ 256"),
    ],
)
def test_calibrate_cli_bad_input(fresh_checkpoint, calibration_text, capsys, extra, message) -> None:
    from sparseinfer.cli import main

    assert main(["calibrate", str(fresh_checkpoint), "--text", str(calibration_text), *extra]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1
    assert __import__("re").search(message, err)


def test_calibrate_cli_short_text(fresh_checkpoint, short_text, capsys) -> None:
    from sparseinfer.cli import main

    assert main(["calibrate", str(fresh_checkpoint), "--text", str(short_text)]) == 2
    assert "too short" in capsys.readouterr().err
