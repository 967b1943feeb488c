"""Calibration text: read a text file, tokenize it, and cut it into equal-length sequences.

Choices (PAPER.md leaves them open): the text is tokenized as one document with the checkpoint's BOS handling,
then cut into consecutive non-overlapping windows of ``seq_len`` tokens (the ragged tail is dropped, so every
sequence has the same length and the capture runs in plain batches; a text shorter than one window becomes a
single sequence of all its tokens). ``num_tokens`` caps the total; the text must
yield at least ``MIN_CALIBRATION_TOKENS`` tokens, since with fewer a ~1000-quantile threshold search is noise.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from sparseinfer.model.tokenizer import Tokenizer

MIN_CALIBRATION_TOKENS = 256  # below this the token-averaged CETT of a layer is too noisy to calibrate on
DEFAULT_SEQ_LEN = 512


def read_text(text_file: str | Path) -> str:
    """The file's text (UTF-8); a clear ValueError naming the file when it is missing or unreadable."""
    path = Path(text_file)
    if not path.is_file():
        raise ValueError(f"--text {path}: no such file")
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"--text {path}: cannot be read as UTF-8 text ({e})") from e


def text_sha256(text_file: str | Path) -> str:
    """sha256 hex digest of the file's bytes (recorded in the sidecar so a calibration is reproducible)."""
    h = hashlib.sha256()
    with open(text_file, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def tokens_to_sequences(
    ids: list[int] | torch.Tensor,
    num_tokens: int | None = None,
    seq_len: int = DEFAULT_SEQ_LEN,
    source: str = "calibration text",
    min_tokens: int = MIN_CALIBRATION_TOKENS,
) -> torch.Tensor:
    """Cut token ids into (N_seq, seq_len) long; ValueError when fewer than ``min_tokens`` survive."""
    if seq_len < 1:
        raise ValueError(f"seq_len must be ≥ 1, got {seq_len}")
    if num_tokens is not None and num_tokens < min_tokens:
        raise ValueError(f"--tokens {num_tokens}: at least {min_tokens} calibration tokens are needed")
    ids = torch.as_tensor(ids, dtype=torch.long).flatten()
    if num_tokens is not None:
        ids = ids[:num_tokens]
    seq_len = min(seq_len, ids.numel()) if ids.numel() >= min_tokens else seq_len
    n_seq = ids.numel() // seq_len
    used = n_seq * seq_len
    if used < min_tokens:
        raise ValueError(
            f"{source} is too short: {ids.numel()} tokens ({used} in whole sequences of --seq-len "
            f"{seq_len}); "
            f"calibration needs at least {min_tokens} tokens"
        )
    return ids[:used].view(n_seq, seq_len)


def load_text_tokens(
    tokenizer: Tokenizer,
    text_file: str | Path,
    num_tokens: int | None = None,
    seq_len: int = DEFAULT_SEQ_LEN,
    min_tokens: int = MIN_CALIBRATION_TOKENS,
) -> torch.Tensor:
    """Tokenize ``text_file`` and return (N_seq, seq_len) long token ids, at most ``num_tokens`` in total."""
    ids = tokenizer.encode(read_text(text_file))
    return tokens_to_sequences(ids, num_tokens, seq_len, source=f"--text {text_file}", min_tokens=min_tokens)
