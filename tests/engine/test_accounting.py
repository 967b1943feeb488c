"""SparsityTally arithmetic against sums written out by hand from random per-step counts."""

from __future__ import annotations

import random

import pytest

from sparseinfer.engine.accounting import SparsityTally
from sparseinfer.engine.sampling import SamplingParams
from sparseinfer.engine.sequence import Sequence


def test_tally_report_equals_brute_force_sums():
    rng = random.Random(0)
    m, nb, L = (10, 12), (40, 50), 2
    tally = SparsityTally("predicted", m, nb)
    steps = []
    for _ in range(7):
        T = rng.randint(1, 4)
        tally.record_step(T)
        layers = []
        for li in range(L):
            sets = [set(rng.sample(range(m[li]), rng.randint(0, m[li]))) for _ in range(T)]
            hot = set(range(m[li] // 2))
            truth = [set(rng.sample(range(m[li]), rng.randint(0, m[li]))) for _ in range(T)]
            measured = li == 0
            tally.record_layer(
                li,
                T,
                sum(len(s) for s in sets),
                sum(len(s & hot) for s in sets),
                len(set().union(*sets)),
                sum(len(t) for t in truth) if measured else None,
                sum(len(t & s) for t, s in zip(truth, sets, strict=True)) if measured else None,
            )
            layers.append((sets, hot, truth))
        steps.append((T, layers))
    r = tally.report()

    tokens = sum(T for T, _ in steps)
    assert r.mode == "predicted" and r.tokens == tokens
    selected = [sum(len(s) for _, ls in steps for s in ls[li][0]) for li in range(L)]
    for li in range(L):
        assert r.layers[li].predicted_active_share == pytest.approx(selected[li] / (tokens * m[li]))
    truly = sum(len(t) for _, ls in steps for t in ls[0][2])
    hit = sum(len(t & s) for _, ls in steps for t, s in zip(ls[0][2], ls[0][0], strict=True))
    assert r.layers[0].true_active_share == pytest.approx(truly / (tokens * m[0]))
    assert r.layers[0].recall == pytest.approx(hit / truly)
    assert r.layers[1].true_active_share is None and r.layers[1].recall is None
    assert r.computed_share == pytest.approx(sum(selected) / (tokens * sum(m)))
    hot = sum(len(s & ls[li][1]) for _, ls in steps for li in range(L) for s in ls[li][0])
    assert r.hot_share == pytest.approx(hot / sum(selected))
    assert r.hot_share + r.cold_share == pytest.approx(1.0)
    read = sum(len(set().union(*ls[li][0])) * nb[li] for _, ls in steps for li in range(L))
    assert r.ffn_bytes_read == read
    assert r.ffn_bytes_dense == len(steps) * sum(a * b for a, b in zip(m, nb, strict=True))


def test_empty_tally_and_sequence_default():
    r = SparsityTally().report()
    assert r.tokens == 0 and r.computed_share == 0.0 and r.hot_share == 0.0 and r.layers == ()
    seq = Sequence([1, 2], SamplingParams(), None, frozenset())
    assert isinstance(seq.sparsity, SparsityTally) and seq.sparsity.mode == "dense"


def test_tally_rejects_bad_input():
    with pytest.raises(ValueError, match="sparsity mode"):
        SparsityTally("fast")
    t = SparsityTally("oracle", (4,), (8,))
    with pytest.raises(ValueError, match="inconsistent counts"):
        t.record_layer(0, 1, 5, 0, 4)  # 5 selected of 4 neurons for 1 token
    with pytest.raises(ValueError, match="truly_computed"):
        t.record_layer(0, 1, 2, 0, 2, truly_active=1, truly_computed=2)
    with pytest.raises(ValueError, match="tokens"):
        t.record_step(0)
