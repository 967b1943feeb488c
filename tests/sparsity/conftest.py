"""Fixtures of the sparsity toolkit's tests (stable names; every tests/sparsity module may use them).

- ``sparse_checkpoint -> Path`` (session): a tiny random non-gated ReLU² checkpoint (hidden 64, 2 layers,
  4 heads, 256 neurons, vocab 512, fp32) written with ``write_random_checkpoint``. Treat it as read-only:
  write sidecars into ``fresh_checkpoint`` or pass ``sidecar_dir``.
- ``gated_checkpoint -> Path`` (session): the same shape with a gated ReLU² FFN (up_proj present).
- ``fresh_checkpoint -> Path`` (function): a private copy of ``sparse_checkpoint`` (same fingerprint) to write
  a sidecar into.
- ``calibration_text -> Path`` (session): a UTF-8 text file of seeded pseudo-English, ~5800 tokens with the
  checkpoint's tokenizer.
- ``short_text -> Path`` (session): a text file far below ``MIN_CALIBRATION_TOKENS``.
- ``tiny_model`` (session): ``sparse_checkpoint`` loaded in float32 (do not mutate; hooks must be removed).
- ``calibration_sequences -> LongTensor (16, 64)`` (session): 1024 tokens of ``calibration_text``.
"""

from __future__ import annotations

import random
import shutil
from pathlib import Path

import pytest
import torch

from sparseinfer.model import Transformer, load_model, load_tokenizer
from sparseinfer.model.random_checkpoint import write_random_checkpoint

_WORDS = (  # noqa: SIM905 (a list literal of 52 words is unreadable)
    "the a model token neuron layer sparse fast slow device memory predicts skip quiet hot cold tail "
    "of and to in on with for every most few some compute kernel weight row column small large machine "
    "runs text language next word one two three four five time first last again while because"
).split()


def _pseudo_text(num_words: int, seed: int) -> str:
    rng = random.Random(seed)
    sentences, words = [], 0
    while words < num_words:
        n = rng.randint(5, 14)
        sentence = " ".join(rng.choice(_WORDS) for _ in range(n))
        sentences.append(sentence[0].upper() + sentence[1:] + rng.choice([".", ".", "!", "?"]))
        words += n
    return " ".join(sentences) + "\n"


@pytest.fixture(scope="session")
def sparse_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_random_checkpoint(tmp_path_factory.mktemp("sparse_relu2"), seed=1)


@pytest.fixture(scope="session")
def gated_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_random_checkpoint(tmp_path_factory.mktemp("gated_relu2"), gated=True, seed=2)


@pytest.fixture
def fresh_checkpoint(sparse_checkpoint: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "checkpoint"
    shutil.copytree(sparse_checkpoint, copy, ignore=shutil.ignore_patterns("sparsity.*"))
    return copy


@pytest.fixture(scope="session")
def calibration_text(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("text") / "calibration.txt"
    path.write_text(_pseudo_text(2500, seed=0), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def short_text(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("short") / "short.txt"
    path.write_text("Too short to calibrate on.\n", encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def tiny_model(sparse_checkpoint: Path) -> Transformer:
    return load_model(sparse_checkpoint, dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def calibration_sequences(sparse_checkpoint: Path, calibration_text: Path) -> torch.Tensor:
    from sparseinfer.sparsity.data import load_text_tokens

    tok = load_tokenizer(sparse_checkpoint)
    return load_text_tokens(tok, calibration_text, num_tokens=1024, seq_len=64)
