"""The byte-level BPE tokenizer of our models, trained on the corpus's train split, and token-id files.

Special tokens: ``<s>`` (id 0, BOS, prepended by the post-processor, as Llama tokenizers do) and ``</s>``
(id 1, EOS, which separates documents in the token stream). Byte-level means every string encodes, no <unk>.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

BOS, EOS = "<s>", "</s>"
BOS_ID, EOS_ID = 0, 1


def train_tokenizer(files: list[Path], vocab_size: int = 8192, show_progress: bool = True) -> Tokenizer:
    """Train a byte-level BPE with ``vocab_size`` entries (specials included) on text ``files``."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab_size < len(alphabet) + 2:
        raise ValueError(
            f"vocab_size must be at least {len(alphabet) + 2} for a byte-level BPE, got {vocab_size}"
        )
    for f in files:
        if not Path(f).is_file():
            raise FileNotFoundError(f"tokenizer training file {f} does not exist")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[BOS, EOS],  # ids 0 and 1, in this order
        initial_alphabet=alphabet,
        show_progress=show_progress,
    )
    tok.train([str(f) for f in files], trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, BOS_ID), (EOS, EOS_ID)]
    )
    return tok


def encode_file(tok: Tokenizer, text_file: Path, batch_lines: int = 2000) -> np.ndarray:
    """All token ids of ``text_file`` as one uint16 stream (vocab ≤ 65536), without BOS: training windows
    are cut anywhere in the stream, so a BOS inside it would be noise."""
    if tok.get_vocab_size() > 65536:
        raise ValueError("uint16 token files need a vocab of at most 65536")
    lines = Path(text_file).read_text(encoding="utf-8").splitlines(keepends=True)
    # Batches of whole lines, encoded in parallel by the tokenizers library. A cut between lines can only
    # change how a run of newlines at the cut is tokenized; the decoded text is the file, byte for byte.
    batches = ["".join(lines[i : i + batch_lines]) for i in range(0, len(lines), batch_lines)]
    encodings = tok.encode_batch(batches, add_special_tokens=False)
    out = [np.asarray(e.ids, dtype=np.uint16) for e in encodings]
    return np.concatenate(out) if out else np.zeros(0, dtype=np.uint16)
