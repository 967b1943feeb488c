"""The tokenizer of a checkpoint directory (its tokenizer.json) and incremental decoding for streaming.

Special-token ids come from every place checkpoints put them: config.json and generation_config.json
(``bos_token_id``, ``eos_token_id``: an int or a list) and tokenizer_config.json (``bos_token``/``eos_token``
as a string or an AddedToken dict). Whether encode() prepends BOS follows tokenizer_config.json's
``add_bos_token`` when present; otherwise BOS is added when the model has one and the tokenizer's
post-processor does not add it already.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer as HFTokenizer

from sparseinfer.model.errors import CheckpointError


def _read_json(file: Path) -> dict:
    if not file.is_file():
        return {}
    try:
        data = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{file}: not valid JSON ({e})") from e
    return data if isinstance(data, dict) else {}


def _token_content(value: Any) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def _ids(value: Any) -> list[int]:
    if value is None:
        return []
    if isinstance(value, int):
        return [value]
    return [int(v) for v in value]


class Tokenizer:
    def __init__(
        self,
        tokenizer: HFTokenizer,
        bos_token_id: int | None,
        eos_token_ids: frozenset[int],
        add_bos: bool | None,
    ) -> None:
        self._tok = tokenizer
        self.bos_token_id = bos_token_id
        self.eos_token_ids = eos_token_ids
        probe = tokenizer.encode("a", add_special_tokens=True).ids
        self._post_adds_bos = bos_token_id is not None and bool(probe) and probe[0] == bos_token_id
        self.add_bos = (bos_token_id is not None) if add_bos is None else add_bos

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        """Token ids of ``text``; ``add_bos=None`` uses the checkpoint's default (see module docstring)."""
        want_bos = self.add_bos if add_bos is None else add_bos
        ids = self._tok.encode(text, add_special_tokens=True).ids
        if self._post_adds_bos and not want_bos and ids and ids[0] == self.bos_token_id:
            ids = ids[1:]
        elif want_bos and self.bos_token_id is not None and not self._post_adds_bos:
            ids = [self.bos_token_id, *ids]
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    @functools.cached_property
    def max_bytes_per_token(self) -> int:
        """An upper bound on the UTF-8 bytes of input text one token stands for, so that a text of more
        than ``n * max_bytes_per_token`` bytes surely has more than ``n`` tokens (the server refuses such a
        prompt before tokenizing it).

        Every input byte appears in some token's vocabulary string, as itself or spelt longer (byte-level
        BPE writes a byte as one or two characters, SentencePiece a space as "▁" and byte fallback as
        "<0xAB>"), so the longest vocabulary string bounds it, unless a normalizer can shorten the text
        first (Unicode composition, case folding...): then a factor of 4 covers the worst composition.
        """
        longest = max(len(piece.encode("utf-8")) for piece in self._tok.get_vocab(with_added_tokens=True))
        return max(1, longest) * (1 if _normalizer_keeps_length(self._tok) else 4)


def _normalizer_keeps_length(tok: HFTokenizer) -> bool:
    """Whether the tokenizer's normalizer never makes a text shorter (none, Prepend, or Replace with content
    at least as long as its pattern, alone or in a Sequence)."""
    normalizer = json.loads(tok.to_str()).get("normalizer")

    def keeps(n: Any) -> bool:
        if n is None or n.get("type") == "Prepend":
            return True
        if n.get("type") == "Sequence":
            return all(keeps(x) for x in n.get("normalizers", []))
        if n.get("type") == "Replace":
            pattern = n.get("pattern", {})
            literal = pattern.get("String") if isinstance(pattern, dict) else None
            return literal is not None and len(n.get("content", "").encode()) >= len(literal.encode())
        return False

    return keeps(normalizer)


def load_tokenizer(path: str | Path) -> Tokenizer:
    """The tokenizer of checkpoint directory ``path`` (needs tokenizer.json)."""
    path = Path(path)
    file = path / "tokenizer.json"
    if not file.is_file():
        raise CheckpointError(
            f"{path}: missing tokenizer.json (only fast-tokenizer files are supported; convert a "
            "sentencepiece tokenizer.model with transformers' AutoTokenizer(...).save_pretrained first)"
        )
    try:
        tok = HFTokenizer.from_file(str(file))
    except Exception as e:  # the tokenizers library raises a bare Exception on parse errors
        raise CheckpointError(f"{file}: cannot be parsed as a tokenizers file ({e})") from e
    config = _read_json(path / "config.json")
    generation = _read_json(path / "generation_config.json")
    tok_config = _read_json(path / "tokenizer_config.json")

    def special(key: str) -> int | None:
        content = _token_content(tok_config.get(key))
        return tok.token_to_id(content) if content is not None else None

    bos = config.get("bos_token_id", generation.get("bos_token_id"))
    bos_id = _ids(bos)[0] if _ids(bos) else special("bos_token")
    eos = set(_ids(config.get("eos_token_id"))) | set(_ids(generation.get("eos_token_id")))
    if (eos_tok := special("eos_token")) is not None:
        eos.add(eos_tok)
    add_bos = tok_config.get("add_bos_token")
    return Tokenizer(tok, bos_id, frozenset(eos), bool(add_bos) if add_bos is not None else None)


class IncrementalDecoder:
    """Turns a growing list of generated ids into newly printable text, one call per step.

    Decoding tokens one at a time is wrong in two ways: a multi-byte UTF-8 character split over byte-level or
    byte-fallback tokens decodes to U+FFFD until its last byte arrives, and SentencePiece-style decoders drop
    the leading space of the first token they see. So we re-decode a short window that starts a few tokens
    back (the context that fixes spacing) and emit only the new suffix, holding it back while it ends in an
    incomplete character.
    """

    def __init__(
        self, tokenizer: Tokenizer, prompt_ids: Sequence[int] = (), skip_special_tokens: bool = True
    ) -> None:
        self._tok = tokenizer
        self._skip = skip_special_tokens
        context = list(prompt_ids)[
            -4:
        ]  # a little prompt context so the first generated token is spaced right
        self._ids: list[int] = context
        self._num_context = len(context)
        self._prefix = 0  # window start: tokens before it are settled
        self._read = len(context)  # tokens before it have been emitted

    def step(self, generated_ids: Sequence[int]) -> str:
        """Given all ids generated so far (a list that only grows), return the text not returned before."""
        new = list(generated_ids)[len(self._ids) - self._num_context :]
        self._ids.extend(new)
        prefix_text = self._tok.decode(self._ids[self._prefix : self._read], self._skip)
        full_text = self._tok.decode(self._ids[self._prefix :], self._skip)
        if len(full_text) > len(prefix_text) and not full_text.endswith("\ufffd"):
            self._prefix, self._read = self._read, len(self._ids)
            return full_text[len(prefix_text) :]
        return ""

    def flush(self) -> str:
        """Whatever is still held back (e.g. a truncated character at the end of generation)."""
        prefix_text = self._tok.decode(self._ids[self._prefix : self._read], self._skip)
        full_text = self._tok.decode(self._ids[self._prefix :], self._skip)
        self._prefix = self._read = len(self._ids)
        return full_text[len(prefix_text) :]
