"""The bundled ReLU² model: complete, small, bf16, its sidecar fingerprinted to exactly these weights, trained
(far better than the same architecture untrained), shipped as package data, and what `generate` runs
by default."""

import fnmatch
import json
from pathlib import Path

import pytest
import tomllib
import torch
from safetensors import safe_open

from sparseinfer.cli import main
from sparseinfer.model import Transformer, load_model, load_tokenizer
from sparseinfer.model.bundled import REQUIRED_FILES, bundled_model_path, check_model_dir
from sparseinfer.sparsity.perplexity import perplexity

ROOT = Path(__file__).resolve().parents[2]
# Genesis 1:1-3 (KJV, in the training corpus) and an Austen sentence: English the model has seen the like of.
TEXT = (
    "In the beginning God created the heaven and the earth. And the earth was without form, and void; and "
    "darkness was upon the face of the deep. And God said, Let there be light: and there was light.\n\n"
    "It is a truth universally acknowledged, that a single man in possession of a good fortune, must be in "
    "want of a wife."
)

try:
    BUNDLE = bundled_model_path()
except FileNotFoundError:
    BUNDLE = None
needs_bundle = pytest.mark.skipif(
    BUNDLE is None, reason="bundled model not built yet (sparseinfer bundle-model)"
)


def test_missing_files_are_named(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match=r"model\.safetensors"):
        check_model_dir(tmp_path)


@needs_bundle
def test_bundle_is_complete_small_and_bf16():
    assert check_model_dir(BUNDLE) == BUNDLE
    total = sum(f.stat().st_size for f in BUNDLE.iterdir() if f.is_file())
    assert total <= 30 * 2**20, f"bundle is {total / 2**20:.1f} MiB"
    config = json.loads((BUNDLE / "config.json").read_text())
    assert config["torch_dtype"] == "bfloat16" and config["hidden_act"] == "relu2"
    with safe_open(BUNDLE / "model.safetensors", "pt") as f:
        dtypes = {f.get_slice(k).get_dtype() for k in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
        names = list(f.keys())
    assert dtypes == {"BF16"}
    assert not any(".up_proj." in n for n in names), "the paper's ReLU² is non-gated"


@needs_bundle
def test_sidecar_matches_the_bundled_weights():
    from sparseinfer.sparsity.sidecar import Sidecar, model_fingerprint

    sidecar = Sidecar.load(BUNDLE)  # raises SidecarError when the fingerprint is not these weights'
    assert sidecar.model_fingerprint == model_fingerprint(BUNDLE)
    for section in ("calibration", "profile", "predictor"):
        assert sidecar.has(section), section
    assert sidecar.sections["calibration"]["cett_target"] == pytest.approx(0.2)
    model = load_model(BUNDLE)
    assert sidecar.thresholds.numel() == model.config.num_layers


@needs_bundle
def test_bundled_model_is_trained():
    tok = load_tokenizer(BUNDLE)
    ids = torch.tensor([tok.encode(TEXT)])  # (1, T)
    trained = load_model(BUNDLE, dtype=torch.float32)
    torch.manual_seed(0)
    untrained = Transformer(trained.config).float().eval()  # same architecture, default (random) init
    ppl_trained = perplexity(trained, ids, progress=False)
    ppl_untrained = perplexity(untrained, ids, progress=False)
    assert ppl_trained * 5 < ppl_untrained, (ppl_trained, ppl_untrained)


@needs_bundle
@pytest.mark.parametrize("sparsity", ["dense", "predicted"])
def test_generate_runs_the_bundled_model_by_default(capsys, monkeypatch, sparsity):
    monkeypatch.delenv("SPARSEINFER_MODEL", raising=False)
    argv = [
        "generate",
        "--prompt",
        "And God said",
        "--max-new-tokens",
        "12",
        "--seed",
        "0",
        "--ignore-eos",
        "--sparsity",
        sparsity,
    ]
    code = main(argv)
    out, err = capsys.readouterr()
    assert code == 0, err
    assert out.strip(), "no text generated"


@needs_bundle
def test_package_data_ships_every_bundle_file():
    patterns = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    patterns = patterns["sparseinfer"]
    package = BUNDLE.parents[1]  # .../sparseinfer
    for f in BUNDLE.iterdir():
        rel = f.relative_to(package).as_posix()
        assert any(fnmatch.fnmatch(rel, p) for p in patterns), f"{rel} is not package data"
    assert set(REQUIRED_FILES) <= {f.name for f in BUNDLE.iterdir()}
