"""StopMatcher: however the text is chunked, the output is the text up to the first stop string."""

import itertools

from hypothesis import given, settings
from hypothesis import strategies as st

from sparseinfer.engine import StopMatcher

ALPHABET = "ab c"


def _first_stop(text: str, stops: list[str]) -> int | None:
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(hits) if hits else None


@settings(max_examples=300, deadline=None)
@given(
    text=st.text(ALPHABET, max_size=30),
    stops=st.lists(st.text(ALPHABET, min_size=1, max_size=4), max_size=3),
    cuts=st.lists(st.integers(0, 30), max_size=10),
)
def test_any_chunking_gives_the_text_before_the_first_stop(text, stops, cuts):
    bounds = sorted({0, len(text), *(c for c in cuts if c <= len(text))})
    chunks = [text[a:b] for a, b in itertools.pairwise(bounds)]
    matcher = StopMatcher(stops)
    out, stopped = [], False
    for chunk in chunks:
        emitted, stopped = matcher.push(chunk)
        out.append(emitted)
        if stopped:
            break
    if not stopped:
        out.append(matcher.flush())
    cut = _first_stop(text, stops)
    assert stopped == (cut is not None)
    assert "".join(out) == (text if cut is None else text[:cut])


def test_holds_back_only_a_possible_prefix():
    matcher = StopMatcher(["</s>", "STOP"])
    assert matcher.push("hello <") == ("hello ", False)
    assert matcher.push("/") == ("", False)
    assert matcher.push("x") == ("</x", False)  # not a stop after all: released
    assert matcher.push(" ST") == (" ", False)
    assert matcher.push("OP and more") == ("", True)


def test_no_stops_passes_text_through():
    matcher = StopMatcher([])
    assert matcher.push("abc") == ("abc", False)
    assert matcher.flush() == ""
