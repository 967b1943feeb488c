"""StopMatcher: generation stops at the first chunk after which the text so far contains a stop string, and
the output is that text up to the earliest stop string in it. (With overlapping stop strings this can depend
on the chunking: for stops ["a", " aa"] and chunks " a" + "a", "a" completes first and " " is emitted,
though " aa" starts earlier in the whole text. A streaming server cannot wait for a stop that may never
complete, so it stops at the first stop to appear, as other servers do.)"""

import itertools

from hypothesis import given, settings
from hypothesis import strategies as st

from sparseinfer.engine import StopMatcher

ALPHABET = "ab c"


def _first_stop(text: str, stops: list[str]) -> int | None:
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(hits) if hits else None


def _expected(chunks: list[str], stops: list[str]) -> tuple[str, bool]:
    """Brute force: re-scan the whole text so far after every chunk."""
    so_far = ""
    for chunk in chunks:
        so_far += chunk
        cut = _first_stop(so_far, stops)
        if cut is not None:
            return so_far[:cut], True
    return so_far, False


@settings(max_examples=300, deadline=None)
@given(
    text=st.text(ALPHABET, max_size=30),
    stops=st.lists(st.text(ALPHABET, min_size=1, max_size=4), max_size=3),
    cuts=st.lists(st.integers(0, 30), max_size=10),
)
def test_any_chunking_gives_the_text_before_the_first_stop_to_appear(text, stops, cuts):
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
    assert ("".join(out), stopped) == _expected(chunks, stops)


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


def test_overlapping_stops_end_at_the_first_to_appear():
    matcher = StopMatcher(["a", " aa"])
    assert matcher.push(" a") == (" ", True)
