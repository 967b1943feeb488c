"""The ReLU² model shipped inside the package: what ``generate`` and ``serve`` run when no model is given.

It is a small (~4M parameter) non-gated ReLU² Llama trained on our offline public-domain corpus
(``sparseinfer corpus`` + ``sparseinfer train --activation relu2``, see docs/activation_study.md), stored in
bf16 with its tokenizer and its sparsity sidecar (CETT 0.2 thresholds, neuron profile, predictors) calibrated
on the bf16 weights themselves, so the sidecar's model fingerprint matches the shipped file.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

BUNDLED_NAME = "relu2-small"
REQUIRED_FILES = (
    "config.json",
    "model.safetensors",
    "tokenizer.json",
    "sparsity.json",
    "sparsity.safetensors",
)


def bundled_model_path() -> Path:
    """Directory of the shipped ReLU² checkpoint; FileNotFoundError naming what is missing otherwise."""
    return check_model_dir(Path(str(resources.files("sparseinfer") / "data" / BUNDLED_NAME)))


def check_model_dir(root: Path) -> Path:
    """``root`` when it holds every file of the bundled model; FileNotFoundError naming the missing ones."""
    missing = [f for f in REQUIRED_FILES if not (root / f).is_file()]
    if missing:
        raise FileNotFoundError(
            f"the bundled model at {root} lacks {', '.join(missing)}: the package was installed without its "
            "data files; reinstall sparseinfer, or pass --model DIR"
        )
    return root
