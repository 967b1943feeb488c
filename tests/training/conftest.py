"""A tiny tokenized corpus on disk (what ``sparseinfer corpus`` writes), built from synthetic text only."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from sparseinfer.training.bpe import encode_file, train_tokenizer

_SENTENCES = [
    "The cat sat on the mat and looked at the dog.",
    "A dog ran across the field to find the ball.",
    "Every morning the baker bakes bread for the town.",
    "The river flows past the old mill toward the sea.",
    "She wrote a letter to her sister about the weather.",
]


def synthetic_text(n_lines: int, seed: int) -> str:
    rng = np.random.default_rng(seed)
    lines = [_SENTENCES[i] for i in rng.integers(0, len(_SENTENCES), n_lines)]
    return "\n".join(" ".join(lines[i : i + 3]) for i in range(0, n_lines, 3)) + "\n"


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("corpus")
    (out / "train.txt").write_text(synthetic_text(600, 0))
    (out / "validation.txt").write_text(synthetic_text(120, 1))
    tok = train_tokenizer([out / "train.txt"], vocab_size=320, show_progress=False)
    tok.save(str(out / "tokenizer.json"))
    for split in ("train", "validation"):
        np.save(out / f"{split}.npy", encode_file(tok, out / f"{split}.txt"))
    return out
