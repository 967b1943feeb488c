"""The BPE tokenizer: round trip, special tokens, and what our runtime tokenizer loader makes of it."""

from __future__ import annotations

import json

import numpy as np
from tokenizers import Tokenizer

from sparseinfer.model.tokenizer import load_tokenizer
from sparseinfer.training.bpe import BOS_ID, EOS_ID, encode_file


def test_round_trip_and_specials(tiny_corpus):
    tok = Tokenizer.from_file(str(tiny_corpus / "tokenizer.json"))
    assert tok.get_vocab_size() == 320
    assert tok.token_to_id("<s>") == BOS_ID and tok.token_to_id("</s>") == EOS_ID
    text = "The cat wrote a letter: naïve façade, 42 €!\nNew line."  # unseen bytes still encode (byte-level)
    enc = tok.encode(text)
    assert enc.ids[0] == BOS_ID
    assert tok.decode(enc.ids) == text


def test_runtime_loader_adds_bos_once(tiny_corpus, tmp_path):
    (tmp_path / "tokenizer.json").write_bytes((tiny_corpus / "tokenizer.json").read_bytes())
    (tmp_path / "config.json").write_text(json.dumps({"bos_token_id": BOS_ID, "eos_token_id": EOS_ID}))
    tok = load_tokenizer(tmp_path)
    ids = tok.encode("The dog ran.")
    assert ids[0] == BOS_ID and ids.count(BOS_ID) == 1
    assert tok.decode(ids) == "The dog ran."
    assert tok.eos_token_ids == frozenset({EOS_ID})


def test_encode_file_matches_whole_text_encoding(tiny_corpus):
    tok = Tokenizer.from_file(str(tiny_corpus / "tokenizer.json"))
    ids = encode_file(tok, tiny_corpus / "validation.txt", batch_lines=7)
    assert ids.dtype == np.uint16
    text = (tiny_corpus / "validation.txt").read_text()
    assert tok.decode(ids.tolist()) == text
