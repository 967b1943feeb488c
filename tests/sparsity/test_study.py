"""The study end to end on the tiny fixture model: the files it writes, and its numbers against independent
re-computations (a brute-force oracle-masked forward, frequencies from plain forward hooks)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from PIL import Image

from sparseinfer.model import load_model, load_tokenizer
from sparseinfer.sparsity.data import load_text_tokens
from sparseinfer.sparsity.neurons import output_norms
from sparseinfer.sparsity.perplexity import perplexity
from sparseinfer.sparsity.plots import PLOT_FILES
from sparseinfer.sparsity.report import REPORT_FILE, num, pct, ppl, signed_pct
from sparseinfer.sparsity.study import STUDY_FILE, cett_list, run_study, split_heldout

TARGETS = (0.005, 0.4)
DEFAULT = 0.2  # not in TARGETS: the study must add it to the sweep
TOKENS, SEQ_LEN = 2048, 64


@pytest.fixture(scope="module")
def study(sparse_checkpoint: Path, calibration_text: Path, tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("study")
    return run_study(
        sparse_checkpoint,
        calibration_text,
        out,
        cett_targets=TARGETS,
        default_cett=DEFAULT,
        tokens=TOKENS,
        heldout_fraction=0.25,
        seq_len=SEQ_LEN,
        predictor_epochs=8,  # the default 20 triples the test's time; recall is met by the threshold anyway
        progress=False,
    )


@pytest.fixture(scope="module")
def heldout(sparse_checkpoint: Path, calibration_text: Path) -> torch.Tensor:
    """The held-out sequences re-derived from the text: the last quarter of the 32 sequences."""
    seqs = load_text_tokens(
        load_tokenizer(sparse_checkpoint), calibration_text, num_tokens=TOKENS, seq_len=SEQ_LEN
    )
    assert seqs.shape == (32, SEQ_LEN)
    return seqs[24:]


def test_writes_report_json_and_valid_pngs(study) -> None:
    out = study.out_dir
    assert (out / STUDY_FILE).is_file() and (out / REPORT_FILE).is_file()
    assert json.loads((out / STUDY_FILE).read_text()) == json.loads(json.dumps(study.data))
    for name in PLOT_FILES.values():
        path = out / name
        assert path.stat().st_size > 5000, name  # a real plot, not an empty canvas
        with Image.open(path) as img:
            img.verify()
        with Image.open(path) as img:
            assert img.format == "PNG" and img.size[0] > 400 and img.size[1] > 300
            grey_levels = img.convert("L").getcolors(maxcolors=256) or range(257)
            assert len(grey_levels) > 20  # drawn lines and text, not a blank image
    report = (out / REPORT_FILE).read_text()
    for name in PLOT_FILES.values():
        assert f"]({name})" in report  # every plot is embedded


def test_split_and_sweep_bookkeeping(study) -> None:
    d = study.data
    assert [r["target"] for r in d["cett"]] == sorted((*TARGETS, DEFAULT))
    t = d["text"]
    assert (t["calibration_sequences"], t["heldout_sequences"]) == (24, 8)
    assert t["calibration_tokens"] + t["heldout_tokens"] == TOKENS
    assert d["model"]["num_layers"] == 2 and d["model"]["intermediate_size"] == 256


def test_sparsity_grows_with_cett_and_tiny_cett_keeps_dense_perplexity(study) -> None:
    rows = study.data["cett"]
    sparsities = [r["sparsity"] for r in rows]
    assert sparsities == sorted(sparsities)
    assert sparsities[-1] > sparsities[0] + 0.1
    for r in rows:
        assert r["sparsity"] == pytest.approx(sum(r["sparsity_per_layer"]) / 2)
        for layer_cett in r["calibration_cett_per_layer"]:
            assert layer_cett <= r["target"] + 1e-6  # calibrated on the calibration split to stay ≤ target
    dense = study.data["dense"]["perplexity"]
    assert rows[0]["target"] == 0.005
    assert rows[0]["perplexity"] == pytest.approx(dense, rel=2e-3)
    assert rows[0]["delta_perplexity"] == pytest.approx(rows[0]["perplexity"] / dense - 1)


def test_thresholds_are_calibrate_on_the_calibration_split_only(
    study, sparse_checkpoint, calibration_text
) -> None:
    from sparseinfer.sparsity.calibrate import calibrate

    model = load_model(sparse_checkpoint, dtype=torch.float32).eval()
    seqs = load_text_tokens(
        load_tokenizer(sparse_checkpoint), calibration_text, num_tokens=TOKENS, seq_len=SEQ_LEN
    )
    for row in study.data["cett"][1:2]:  # the default target (one calibration keeps the test fast)
        assert row["target"] == DEFAULT
        expected = calibrate(model, seqs[:24], row["target"], progress=False)
        assert row["thresholds"] == pytest.approx(expected.thresholds.tolist(), rel=1e-6)
        assert row["calibration_cett_per_layer"] == pytest.approx(expected.cett_per_layer)


def _brute_force_oracle(model, seqs: torch.Tensor, thresholds: list[float]) -> tuple[float, list[float]]:
    """Perplexity and per-layer sparsity with each FFN replaced by an explicit sum over its active neurons
    (n_i = h_i W_out[:, i], kept iff ‖n_i‖ ≥ ε_l) — no hooks, no library masking code."""
    originals = [layer.mlp.forward for layer in model.layers]
    active_counts = [0] * len(model.layers)
    tokens = [0] * len(model.layers)

    def make(layer_index: int, ffn):
        def forward(x: torch.Tensor, step=None) -> torch.Tensor:
            h = ffn.neuron_activations(x)  # (B, T, m)
            n = h.unsqueeze(-2) * ffn.down_proj.weight  # (B, T, d, m): every neuron's output vector
            keep = torch.linalg.vector_norm(n, dim=-2) >= thresholds[layer_index]  # (B, T, m)
            active_counts[layer_index] += int(keep.sum())
            tokens[layer_index] += keep[..., 0].numel()
            return (n * keep.unsqueeze(-2)).sum(-1)  # (B, T, d)

        return forward

    try:
        for i, layer in enumerate(model.layers):
            layer.mlp.forward = make(i, layer.mlp)
        value = perplexity(model, seqs, batch_size=4, progress=False)
    finally:
        for layer, original in zip(model.layers, originals, strict=True):
            layer.mlp.forward = original
    m = model.layers[0].mlp.down_proj.in_features
    return value, [1 - a / (t * m) for a, t in zip(active_counts, tokens, strict=True)]


def test_oracle_figures_match_a_brute_force_truncated_forward(study, sparse_checkpoint, heldout) -> None:
    model = load_model(sparse_checkpoint, dtype=torch.float32).eval()
    row = next(r for r in study.data["cett"] if r["target"] == DEFAULT)
    value, layer_sparsity = _brute_force_oracle(model, heldout, row["thresholds"])
    assert row["perplexity"] == pytest.approx(value, rel=1e-4)
    assert row["sparsity_per_layer"] == pytest.approx(layer_sparsity, abs=2e-3)  # fp ties at ε only
    dense = math.exp(
        torch.nn.functional.cross_entropy(
            model(heldout)[:, :-1].reshape(-1, 512), heldout[:, 1:].reshape(-1)
        ).item()
    )
    assert study.data["dense"]["perplexity"] == pytest.approx(dense, rel=1e-5)


def test_frequencies_match_plain_forward_hooks(study, sparse_checkpoint, heldout) -> None:
    model = load_model(sparse_checkpoint, dtype=torch.float32).eval()
    eps = next(r for r in study.data["cett"] if r["target"] == DEFAULT)["thresholds"]
    captured: dict[int, torch.Tensor] = {}
    handles = [
        layer.mlp.register_forward_hook(lambda mod, args, out, i=i: captured.__setitem__(i, args[0].detach()))
        for i, layer in enumerate(model.layers)
    ]
    try:
        with torch.no_grad():
            model(heldout)  # dense forward: every layer's FFN input
    finally:
        for h in handles:
            h.remove()
    for layer, skew in enumerate(study.data["frequency"]["skew_per_layer"]):
        ffn = model.layers[layer].mlp
        mags = ffn.neuron_activations(captured[layer]).abs() * output_norms(ffn)  # (B, T, m)
        freq = (mags >= eps[layer]).float().mean((0, 1))  # (m,)
        ordered = sorted(freq.tolist(), reverse=True)
        assert skew["top10"] == pytest.approx(sum(ordered[:26]) / sum(ordered), abs=1e-3)  # ceil(0.1·256)
        assert skew["top50"] == pytest.approx(sum(ordered[:128]) / sum(ordered), abs=1e-3)
        curve = study.data["frequency"]["sorted_curve_per_layer"][layer]
        assert curve[0] == pytest.approx(ordered[0], abs=2e-3)
        assert curve[-1] == pytest.approx(ordered[-1], abs=2e-3)
        # the truly inactive share at the default target matches the predictor table's true sparsity
        pred = study.data["predictor"]["layers"][layer]
        assert pred["true_sparsity"] == pytest.approx(1 - float(freq.mean()), abs=1e-3)


def test_affinity_and_predictor_sections_are_sane(study) -> None:
    a = study.data["affinity"]
    assert a["windows"] == [1, 2, 3, 4, 5]
    for curve in a["reuse_per_layer"]:
        assert all(0 <= v <= 1 for v in curve)
        assert curve == sorted(curve)  # a larger window contains the smaller one: reuse cannot drop
    assert all(0 <= g <= 1 for g in a["coactivation_gap_per_layer"])
    p = study.data["predictor"]
    assert p["source"] == "trained on the calibration split"
    assert 0 < p["run_sparsity"] < 1 and p["perplexity"] > 1
    for layer in p["layers"]:
        assert layer["recall"] > 0.9  # target 0.99 on validation; these are held-out tokens
        assert 0 <= layer["predicted_sparsity"] <= layer["true_sparsity"] + 0.05


def test_report_contains_the_json_figures(study) -> None:
    report = (study.out_dir / REPORT_FILE).read_text()
    d = study.data
    assert ppl(d["dense"]["perplexity"]) in report
    for r in d["cett"]:
        cells = [
            f"{r['target']:g}",
            pct(r["sparsity"]),
            ppl(r["perplexity"]),
            signed_pct(r["delta_perplexity"]),
        ]
        row = "| " + " | ".join(cells) + " |"
        assert row in report
        for s in r["sparsity_per_layer"]:
            assert pct(s) in report
    assert ppl(d["predictor"]["perplexity"]) in report
    for layer in d["predictor"]["layers"]:
        assert pct(layer["recall"]) in report and pct(layer["predicted_sparsity"]) in report
    for v in d["affinity"]["reuse"]:
        assert pct(v) in report
    for g in d["affinity"]["coactivation_gap_per_layer"]:
        assert num(g) in report
    for s in d["frequency"]["skew_per_layer"]:
        assert pct(s["top20"]) in report


def test_split_heldout_is_the_tail_and_disjoint() -> None:
    seqs = torch.arange(40).view(10, 4)
    cal, held = split_heldout(seqs, 0.25)
    assert cal.shape[0] == 7 and held.shape[0] == 3  # ceil(2.5)
    assert torch.equal(torch.cat([cal, held]), seqs)
    assert not set(cal.flatten().tolist()) & set(held.flatten().tolist())
    with pytest.raises(ValueError, match="at least 2"):
        split_heldout(seqs[:1], 0.25)


def test_cett_list_parses_and_names_bad_entries() -> None:
    assert cett_list("0.01, 0.2,0.5") == (0.01, 0.2, 0.5)
    for bad, message in [
        ("0.1,abc", "'abc' is not a number"),
        ("0.1,,0.2", "empty entry"),
        ("0,0.2", "0 is outside"),
        ("0.2,1", "1 is outside"),
        ("-0.1", "outside"),
        ("nan", "outside"),
    ]:
        with pytest.raises(ValueError, match=message):
            cett_list(bad)


def test_run_study_rejects_bad_settings(sparse_checkpoint, calibration_text, tmp_path) -> None:
    with pytest.raises(ValueError, match="CETT target must be in"):
        run_study(sparse_checkpoint, calibration_text, tmp_path, cett_targets=(0.2, 1.5))
    with pytest.raises(ValueError, match="heldout_fraction"):
        run_study(sparse_checkpoint, calibration_text, tmp_path, heldout_fraction=1.0)
    assert not any(tmp_path.iterdir())  # nothing written before the settings are checked


def _write_sidecar(checkpoint: Path, text_sha: str, cett_target: float) -> None:
    from sparseinfer.sparsity.predictor import LowRankPredictor, PredictorSet
    from sparseinfer.sparsity.sidecar import Sidecar, model_fingerprint

    predictors = [LowRankPredictor(64, 256, 3) for _ in range(2)]
    pset = PredictorSet(predictors, torch.tensor([0.3, 0.4]), recall_target=0.95)
    sidecar = Sidecar(checkpoint, model_fingerprint(checkpoint))
    sidecar.set_section(
        "calibration",
        {"thresholds": torch.tensor([0.1, 0.1])},
        {"cett_target": cett_target, "text_sha256": text_sha},
    )
    sidecar.set_section("predictor", pset.state_tensors(), pset.manifest())
    sidecar.save()


def test_sidecar_predictors_are_used_only_when_trained_on_other_text(
    fresh_checkpoint, calibration_text
) -> None:
    from sparseinfer.sparsity.data import text_sha256
    from sparseinfer.sparsity.study import StudyConfig, _load_sidecar_predictors

    sha = text_sha256(calibration_text)
    cfg = StudyConfig(fresh_checkpoint, calibration_text, fresh_checkpoint / "out", predictors="sidecar")
    assert _load_sidecar_predictors(cfg, sha) is None  # no sidecar at all
    _write_sidecar(fresh_checkpoint, "0" * 64, DEFAULT)
    loaded = _load_sidecar_predictors(cfg, sha)
    assert loaded is not None and loaded.rank == 3 and loaded.recall_target == 0.95
    _write_sidecar(
        fresh_checkpoint, sha, DEFAULT
    )  # trained on the study's own text: could have seen held-out
    assert _load_sidecar_predictors(cfg, sha) is None
    _write_sidecar(fresh_checkpoint, "0" * 64, 0.1)  # another CETT target: other labels
    assert _load_sidecar_predictors(cfg, sha) is None
