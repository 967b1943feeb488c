"""Corpus cleaning and splitting on small synthetic inputs (the fetch needs the network: not tested)."""

from __future__ import annotations

import pytest

from sparseinfer.training.corpus import (
    Document,
    chunk,
    normalise,
    parse_bible_output,
    split_documents,
    strip_gutenberg,
)

GUTENBERG = """The Project Gutenberg EBook of Something, by Someone

This eBook is for the use of anyone anywhere at no cost.

*** START OF THIS PROJECT GUTENBERG EBOOK SOMETHING ***

Chapter 1

It was a dark night.

*** END OF THIS PROJECT GUTENBERG EBOOK SOMETHING ***

End of the Project Gutenberg EBook. Licence text follows.
"""


def test_strip_gutenberg_keeps_only_the_body():
    assert strip_gutenberg(GUTENBERG).split() == ["Chapter", "1", "It", "was", "a", "dark", "night."]


def test_strip_gutenberg_drops_short_notices_without_markers():
    text = "Hamlet\nThis etext was produced by Project Gutenberg volunteers.\nTo be, or not to be."
    assert strip_gutenberg(text) == "Hamlet\nTo be, or not to be."


def test_normalise_unicode_whitespace_and_blank_lines():
    raw = "\ufeffﬁrst  line \r\n\tsecond\x07\n\n\n\n\nthird   \n"
    assert normalise(raw) == "first line\n second\n\nthird\n"


def test_chunk_cuts_at_paragraphs_only():
    paras = [f"paragraph {i} " + "x" * 30 for i in range(10)]
    pieces = chunk("\n\n".join(paras), target_chars=100)
    assert "".join(pieces).replace("\n", "") == "".join(paras)
    assert all(p.endswith("\n") for p in pieces)
    assert all(len(p) < 100 + 50 for p in pieces)  # a piece stops at the first paragraph that reaches target
    assert len(pieces) == 4  # 10 paragraphs of 45 chars: three pieces of three, one of one


def _docs() -> list[Document]:
    return [
        Document(src, f"{src}{k}", "\n\n".join(f"{src} {k} para {i} " + "y" * 40 for i in range(50)))
        for src in ("a", "b")
        for k in range(3)
    ]


def test_split_is_deterministic_disjoint_and_complete():
    fractions = {"validation": 0.1, "calibration": 0.1}
    s1 = split_documents(_docs(), fractions, seed=3, chunk_chars=200)
    s2 = split_documents(_docs(), fractions, seed=3, chunk_chars=200)
    s3 = split_documents(_docs(), fractions, seed=4, chunk_chars=200)
    assert s1 == s2
    assert s1 != s3
    all_chunks = [c for v in s1.values() for c in v]
    assert len(all_chunks) == len(set(all_chunks))  # every chunk lands in exactly one split
    expected = sorted(c for d in _docs() for c in chunk(normalise(d.text), 200))
    assert sorted(all_chunks) == expected
    total = sum(map(len, all_chunks))
    for name in ("validation", "calibration"):
        share = sum(map(len, s1[name])) / total
        assert 0.1 <= share < 0.1 + 0.05  # filled up to the fraction, overshooting by < one chunk
    assert {src for c in s1["validation"] + s1["calibration"] for src in c[:1]} == {"a", "b"}


def test_split_rejects_bad_fractions_and_empty_input():
    with pytest.raises(ValueError, match="train"):
        split_documents(_docs(), {"train": 0.5}, seed=0, chunk_chars=100)
    with pytest.raises(ValueError, match="no text"):
        split_documents([Document("a", "empty", "  \n\n ")], {"validation": 0.1}, seed=0, chunk_chars=100)


BIBLE_OUTPUT = """
Genesis 1

  1 In the beginning God created the heaven and the earth.
  2 And the earth was without form, and void; and darkness was upon the face of
the deep.

Genesis 2

  1 Thus the heavens and the earth were finished.

1 John 1

  1 That which was from the beginning, which we have heard.
"""


def test_parse_bible_output_one_document_per_book_without_verse_numbers():
    docs = parse_bible_output(BIBLE_OUTPUT)
    assert [d.name for d in docs] == ["Genesis", "1 John"]
    assert all(d.source == "kjv" for d in docs)
    assert docs[0].text == (
        "Genesis 1\n\nIn the beginning God created the heaven and the earth.\n"
        "And the earth was without form, and void; and darkness was upon the face of\nthe deep.\n\n"
        "Genesis 2\n\nThus the heavens and the earth were finished."
    )
    assert docs[1].text == "1 John 1\n\nThat which was from the beginning, which we have heard."
