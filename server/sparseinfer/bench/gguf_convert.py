"""Run llama.cpp's own convert_hf_to_gguf.py on one of our checkpoints:
``python -m sparseinfer.bench.gguf_convert LLAMA_CPP_SRC CHECKPOINT [converter args...]``.

The converter names a BPE tokenizer's pre-tokenizer by hashing how it splits a test string, and refuses a
tokenizer whose hash is not in its table, which ours (trained here) are not. They are GPT-2's byte-level
BPE with GPT-2's split regex (``pre_tokenizers.ByteLevel(use_regex=True)``), which llama.cpp implements as
the pre-tokenizer "gpt-2"; this wrapper checks exactly that in tokenizer.json and, for such a tokenizer
only, answers "gpt-2" where the converter would give up. Everything else (weights, config, vocab, merges)
is the converter's own work. Decode speed does not depend on the tokenizer at all: the point is a GGUF of
the very same weights.
"""

from __future__ import annotations

import json
import runpy
import sys
from pathlib import Path


def is_gpt2_byte_level(checkpoint: Path) -> bool:
    """Whether the checkpoint's tokenizer.json is a BPE model behind GPT-2's byte-level pre-tokenizer."""
    try:
        tok = json.loads((checkpoint / "tokenizer.json").read_text())
    except (OSError, ValueError):
        return False
    pre = tok.get("pre_tokenizer") or {}
    return (
        (tok.get("model") or {}).get("type") == "BPE"
        and pre.get("type") == "ByteLevel"
        and pre.get("use_regex", True) is True
    )


def main(argv: list[str]) -> None:
    src, checkpoint, *rest = argv
    src_dir, checkpoint_dir = Path(src), Path(checkpoint)
    sys.path[:0] = [str(src_dir), str(src_dir / "gguf-py")]
    sys.argv = [str(src_dir / "convert_hf_to_gguf.py"), str(checkpoint_dir), *rest]
    if is_gpt2_byte_level(checkpoint_dir):
        import conversion.base as base  # llama.cpp's converter package (under src_dir)

        known = base.TextModel.get_vocab_base_pre

        def pre_tokenizer(self: object, tokenizer: object) -> str:
            try:
                return known(self, tokenizer)
            except NotImplementedError:  # not in the hash table: ours, GPT-2's scheme (checked above)
                return "gpt-2"

        base.TextModel.get_vocab_base_pre = pre_tokenizer
    runpy.run_path(sys.argv[0], run_name="__main__")


if __name__ == "__main__":
    main(sys.argv[1:])
