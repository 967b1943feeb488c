"""A tiny training run: the loss falls, the checkpoint loads in our runtime and (gated) in transformers with
the same logits, and the four variants have matched FFN sizes."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from sparseinfer.model import load_model
from sparseinfer.training.train import (
    VARIANTS,
    TrainConfig,
    batch_starts,
    build_model,
    train,
    training_logits,
)

# One thread: tiny matmuls on a busy 2-core machine are dominated by thread hand-offs otherwise.
TINY = dict(
    hidden=32,
    layers=2,
    heads=2,
    neurons=96,
    context=32,
    batch=8,
    lr=1e-2,
    warmup=5,
    eval_windows=4,
    threads=1,
)


@pytest.fixture(scope="module")
def trained(tiny_corpus, tmp_path_factory):
    out = {}
    for act in ("relu2", "swiglu"):
        cfg = TrainConfig(activation=act, steps=40, **TINY)
        path = tmp_path_factory.mktemp(act)
        out[act] = (path, train(cfg, tiny_corpus, path, progress=False, log=lambda s: None))
    return out


def test_loss_decreases_and_log_is_complete(trained):
    for path, record in trained.values():
        assert record["loss_last"] < record["loss_first"] - 1.0
        assert record["val_perplexity"] < 320 / 4  # far better than uniform over the 320-token vocab
        saved = json.loads((path / "train_log.json").read_text())
        assert saved["tokens_seen"] == 40 * 8 * 32
        assert saved["params"] == record["params"]


def test_checkpoint_loads_in_our_runtime_with_training_logits(trained):
    for path, _ in trained.values():
        model = load_model(path)
        tokens = torch.randint(2, 320, (2, 20), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            ours = model(tokens)
            train_fwd = training_logits(model, tokens)
        torch.testing.assert_close(ours, train_fwd, atol=1e-4, rtol=1e-4)


def test_gated_checkpoint_matches_transformers(trained):
    transformers = pytest.importorskip("transformers")
    path, _ = trained["swiglu"]
    hf = transformers.LlamaForCausalLM.from_pretrained(path).eval()
    ours = load_model(path)
    tokens = torch.randint(2, 320, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(ours(tokens), hf(tokens).logits, atol=1e-4, rtol=1e-4)


def test_variants_have_matched_ffn_parameters():
    counts = {}
    for act in VARIANTS:
        model = build_model(TrainConfig(activation=act, hidden=192, neurons=768, steps=1), vocab=512)
        counts[act] = sum(p.numel() for n, p in model.named_parameters() if ".mlp." in n)
        assert model.config.ffn_gated == VARIANTS[act][1]
    assert max(counts.values()) / min(counts.values()) - 1 < 0.002


def test_batch_order_is_shared_by_all_variants():
    a = batch_starts(10_000, TrainConfig(activation="relu2", steps=5))
    b = batch_starts(10_000, TrainConfig(activation="swiglu", steps=5))
    np.testing.assert_array_equal(a, b)


def test_bad_config_names_the_field():
    with pytest.raises(ValueError, match="activation"):
        TrainConfig(activation="gelu")
    with pytest.raises(ValueError, match="steps"):
        TrainConfig(steps=0)


def test_a_run_split_and_resumed_ends_with_the_uninterrupted_weights(tiny_corpus, tmp_path):
    from safetensors.torch import load_file

    from sparseinfer.training.train import STATE_FILE, RunControl

    cfg = TrainConfig(activation="relu2", steps=12, **TINY)
    quiet = {"progress": False, "log": lambda s: None}
    whole = train(cfg, tiny_corpus, tmp_path / "whole", **quiet)
    split = tmp_path / "split"
    assert train(cfg, tiny_corpus, split, control=RunControl(stop_after=5), **quiet) == {"stopped_at": 5}
    assert (split / STATE_FILE).is_file() and not (split / "model.safetensors").exists()
    resumed = RunControl(stop_after=4, resume=True, save_every=2)
    assert train(cfg, tiny_corpus, split, control=resumed, **quiet) == {"stopped_at": 9}
    record = train(cfg, tiny_corpus, split, control=RunControl(resume=True), **quiet)
    assert not (split / STATE_FILE).exists()  # finished: only the checkpoint remains
    a, b = load_file(tmp_path / "whole" / "model.safetensors"), load_file(split / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert record["loss_curve"] == whole["loss_curve"] and record["val_perplexity"] == whole["val_perplexity"]


def test_resume_refuses_other_settings(tiny_corpus, tmp_path):
    from sparseinfer.training.train import RunControl

    quiet = {"progress": False, "log": lambda s: None}
    train(
        TrainConfig(activation="relu2", steps=6, **TINY),
        tiny_corpus,
        tmp_path,
        control=RunControl(stop_after=2),
        **quiet,
    )
    other = TrainConfig(activation="relu2", steps=6, **{**TINY, "lr": 1e-3})
    with pytest.raises(ValueError, match="lr"):
        train(other, tiny_corpus, tmp_path, control=RunControl(resume=True), **quiet)
    with pytest.raises(FileNotFoundError):
        train(other, tiny_corpus, tmp_path / "none", control=RunControl(resume=True), **quiet)
