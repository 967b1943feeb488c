"""admission.admissible on plain numbers: FIFO under rows, slots, the token budget and the prefill cap."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sparseinfer.serving.admission import Candidate, admissible
from sparseinfer.serving.config import Limits


def c(prompt, new=10):
    return Candidate(prompt, prompt + new)


@pytest.mark.parametrize(
    ("waiting", "running", "reserved", "free", "limits", "expected"),
    [
        ([c(5)] * 6, 0, 0, 8, Limits(max_batch_size=4), 4),  # batch rows
        ([c(5)] * 6, 3, 45, 8, Limits(max_batch_size=4), 1),  # rows left beside the running ones
        ([c(5)] * 6, 0, 0, 2, Limits(max_batch_size=4), 2),  # cache slots
        ([c(5)] * 6, 0, 0, 8, Limits(max_prefill_tokens=12), 2),  # 3 x 5 padded tokens > 12
        ([c(20), c(1)], 0, 0, 8, Limits(max_prefill_tokens=12), 1),  # the first is taken whatever its length
        ([c(1), c(20)], 0, 0, 8, Limits(max_prefill_tokens=12), 1),  # padding to the longest counts
        ([c(50), c(1)], 1, 40, 8, Limits(max_total_tokens=90), 0),  # FIFO: the small one does not jump ahead
        ([c(50)], 0, 0, 8, Limits(max_total_tokens=40), 1),  # nothing running: the first always starts
        ([], 0, 0, 8, Limits(), 0),
    ],
)
def test_admission_rules(waiting, running, reserved, free, limits, expected):
    assert admissible(waiting, running, reserved, free, limits) == expected


@given(
    prompts=st.lists(st.integers(1, 300), max_size=20),
    running=st.integers(0, 16),
    free=st.integers(0, 16),
    budget=st.one_of(st.none(), st.integers(1, 3000)),
    cap=st.integers(1, 2048),
)
def test_admitted_prefix_respects_every_limit(prompts, running, free, budget, cap):
    limits = Limits(max_batch_size=16, max_total_tokens=budget, max_prefill_tokens=cap)
    waiting = [c(p) for p in prompts]
    reserved = 30 * running
    n = admissible(waiting, running, reserved, free, limits)
    taken = waiting[:n]
    assert 0 <= n <= max(0, min(16 - running, free))
    if n > 1:
        assert max(t.prompt_tokens for t in taken) * n <= cap
    if budget is not None and n > 0 and (running or n > 1):  # only a lone first request may exceed it
        assert reserved + sum(t.reserved for t in taken) <= budget
