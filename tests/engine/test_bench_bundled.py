"""``sparseinfer bench bundled`` on the shipped ReLU² model with tiny settings: its perplexities against the
study's own tools run on a separate, plain copy of the model (``sparsity.perplexity`` dense, under
``oracle_truncation`` and ``predicted_truncation``), and the sparse modes compute fewer neurons."""

from __future__ import annotations

import json
import math

import pytest
import torch

from sparseinfer.bench.bundled import mode_perplexity
from sparseinfer.cli import main
from sparseinfer.engine.factory import EngineConfig, load_engine
from sparseinfer.model import load_model, load_tokenizer
from sparseinfer.model.bundled import bundled_model_path
from sparseinfer.sparsity.data import load_text_tokens
from sparseinfer.sparsity.masking import oracle_truncation
from sparseinfer.sparsity.perplexity import perplexity, predicted_truncation
from sparseinfer.sparsity.predictor import PredictorSet
from sparseinfer.sparsity.sidecar import Sidecar

# Genesis 1:1-10, King James Version (public domain): held-out-style text the model was not calibrated on.
KJV = """\
In the beginning God created the heaven and the earth.
And the earth was without form, and void; and darkness was upon the face of the deep. And the Spirit of God
moved upon the face of the waters.
And God said, Let there be light: and there was light.
And God saw the light, that it was good: and God divided the light from the darkness.
And God called the light Day, and the darkness he called Night. And the evening and the morning were the
first day.
And God said, Let there be a firmament in the midst of the waters, and let it divide the waters from the
waters.
And God made the firmament, and divided the waters which were under the firmament from the waters which were
above the firmament: and it was so.
And God called the firmament Heaven. And the evening and the morning were the second day.
And God said, Let the waters under the heaven be gathered together unto one place, and let the dry land
appear: and it was so.
And God called the dry land Earth; and the gathering together of the waters called he Seas: and God saw that
it was good.
"""
TOKENS, SEQ_LEN = 128, 32


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bench_bundled")
    text = tmp / "genesis.txt"
    text.write_text(KJV)
    argv = ["bench", "bundled", "--text", str(text), "--tokens", str(TOKENS), "--seq-len", str(SEQ_LEN)]
    argv += ["--prompt-tokens", "8", "--new-tokens", "4", "--rounds", "1", "--results", str(tmp / "out")]
    assert main(argv) == 0
    result = json.loads((tmp / "out" / "bundled.json").read_text())
    table = (tmp / "out" / "bundled.md").read_text()
    return text, result, table


def _sequences(text):
    path = bundled_model_path()
    return load_text_tokens(load_tokenizer(path), text, TOKENS, SEQ_LEN, min_tokens=SEQ_LEN)


def test_dense_perplexity_equals_the_study_tools(bench):
    text, result, table = bench
    rows = {r["mode"]: r for r in result["rows"]}
    assert list(rows) == ["dense", "oracle", "predicted"]
    seqs = _sequences(text)
    assert result["meta"]["perplexity_sequences"] == list(seqs.shape) == [TOKENS // SEQ_LEN, SEQ_LEN]
    expected = perplexity(load_model(bundled_model_path()), seqs, progress=False)
    # Dense rows through the executors sum the down projection over the tier's W_out^T rows (a CPU tier
    # keeps no second copy of it), so they equal the plain model up to summation order: in fp32 to ~1e-6
    # (checked exactly below), in bf16 to its rounding (1.3e-3 measured on the context-512 bundled model).
    assert rows["dense"]["perplexity"] == pytest.approx(expected, rel=3e-3)
    path = bundled_model_path()
    engine = load_engine(path, EngineConfig(max_seq=64, per_request_modes=True, dtype=torch.float32))
    fp32, _ = mode_perplexity(engine.model, engine.sparsity, seqs, "dense", 8)
    plain = perplexity(load_model(path, dtype=torch.float32), seqs, progress=False)
    assert fp32 == pytest.approx(plain, rel=1e-5)
    dense = rows["dense"]
    assert f"| dense | {dense['decode_tokens_per_s']:.1f} | {dense['perplexity']:.3f} |" in table


def test_sparse_perplexities_match_the_truncated_model(bench):
    # The engine's oracle / predicted executors vs the study's hooks zeroing h on a plain copy (bf16: the
    # executors sum fewer terms in another order; measured ≤ 0.1% apart, while the modes move the
    # perplexity by ~2% on this text, so 0.5% tells a mode that was not applied).
    text, result, _ = bench
    rows = {r["mode"]: r for r in result["rows"]}
    seqs = _sequences(text)
    path = bundled_model_path()
    sidecar = Sidecar.load(path)
    model = load_model(path)
    with oracle_truncation(model, sidecar.thresholds):
        oracle = perplexity(model, seqs, progress=False)
    preds = PredictorSet.from_state(sidecar.section_tensors("predictor"), sidecar.require("predictor"))
    with predicted_truncation(model, preds):
        predicted = perplexity(model, seqs, progress=False)
    assert rows["oracle"]["perplexity"] == pytest.approx(oracle, rel=5e-3)
    assert rows["predicted"]["perplexity"] == pytest.approx(predicted, rel=5e-3)
    assert abs(oracle / rows["dense"]["perplexity"] - 1) > 1e-2  # the truncation does change the model


def test_sparse_modes_compute_fewer_neurons(bench):
    _, result, _ = bench
    rows = {r["mode"]: r for r in result["rows"]}
    assert rows["dense"]["decode_computed_share"] == rows["dense"]["perplexity_computed_share"] == 1.0
    for mode in ("oracle", "predicted"):
        assert 0.0 < rows[mode]["decode_computed_share"] < 1.0
        assert 0.0 < rows[mode]["perplexity_computed_share"] < 1.0
    for row in result["rows"]:
        assert row["perplexity_tokens"] == TOKENS
        assert row["decode_tokens_per_s"] > 0 and math.isfinite(row["perplexity"])


def test_bad_arguments_are_refused(tmp_path):
    text = tmp_path / "t.txt"
    text.write_text(KJV)
    base = ["bench", "bundled", "--text", str(text)]
    assert main([*base, "--modes", "sparse"]) == 2
    assert main([*base, "--new-tokens", "1"]) == 2
    assert main(["bench", "bundled", "--text", str(tmp_path / "missing.txt")]) == 2


def test_quantized_formats_keep_perplexity_and_recall(tmp_path):
    # --weights loads one engine per format: a q4_0 model is the same model to within its rounding, so its
    # perplexity stays near the checkpoint's and the predictor (quantized too) still finds the active sets.
    text = tmp_path / "genesis.txt"
    text.write_text(KJV)
    argv = ["bench", "bundled", "--text", str(text), "--tokens", str(TOKENS), "--seq-len", str(SEQ_LEN)]
    argv += ["--prompt-tokens", "8", "--new-tokens", "4", "--rounds", "1", "--results", str(tmp_path)]
    argv += ["--weights", "checkpoint", "q4_0", "--modes", "dense", "predicted"]
    assert main(argv) == 0
    rows = {(r["weights"], r["mode"]): r for r in json.loads((tmp_path / "bundled.json").read_text())["rows"]}
    assert set(rows) == {(w, m) for w in ("checkpoint", "q4_0") for m in ("dense", "predicted")}
    base, q4 = rows["checkpoint", "dense"]["perplexity"], rows["q4_0", "dense"]["perplexity"]
    assert q4 != base  # the quantized engine really ran on other weights
    assert q4 == pytest.approx(base, rel=0.05)
    for fmt in ("checkpoint", "q4_0"):
        assert rows[fmt, "dense"]["recall"] is None
        assert 0.9 < rows[fmt, "predicted"]["recall"] <= 1.0
    recall = rows["checkpoint", "predicted"]["recall"]
    assert rows["q4_0", "predicted"]["recall"] == pytest.approx(recall, abs=0.03)
    assert "| q4_0 | predicted |" in (tmp_path / "bundled.md").read_text()
