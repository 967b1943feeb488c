"""Reuse ratio and co-activation gap against brute-force implementations with python sets and loops."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sparseinfer.sparsity.metrics import coactivation_gap, reuse_ratio


def brute_reuse(masks: torch.Tensor, k: int) -> float:
    ratios = []
    for seq in masks if masks.dim() == 3 else [masks]:
        sets = [{i for i in range(seq.shape[1]) if seq[t, i]} for t in range(seq.shape[0])]
        for t in range(k, len(sets)):
            if not sets[t]:
                continue
            window = set().union(*sets[t - k : t])
            ratios.append(len(sets[t] & window) / len(sets[t]))
    return sum(ratios) / len(ratios) if ratios else math.nan


def brute_gap(masks: torch.Tensor) -> float:
    masks = masks.reshape(-1, masks.shape[-1])
    n, m = masks.shape
    alive = [i for i in range(m) if any(bool(masks[t, i]) for t in range(n))]
    if len(alive) < 2:
        return math.nan
    M = [[0.0] * len(alive) for _ in alive]
    for a, i in enumerate(alive):
        count_i = sum(1 for t in range(n) if masks[t, i])
        for b, j in enumerate(alive):
            if i != j:
                M[a][b] = sum(1 for t in range(n) if masks[t, i] and masks[t, j]) / count_i
    mm = len(alive)
    return sum(max(row) for row in M) / mm - sum(map(sum, M)) / (mm * mm)


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    s=st.integers(1, 3),
    t=st.integers(1, 12),
    m=st.integers(1, 9),
    k=st.integers(1, 5),
    p=st.floats(0.05, 0.9),
    chunk=st.integers(1, 6),
)
def test_reuse_ratio_matches_brute_force(
    seed: int, s: int, t: int, m: int, k: int, p: float, chunk: int
) -> None:
    g = torch.Generator().manual_seed(seed)
    masks = torch.rand(s, t, m, generator=g) < p
    got, expected = reuse_ratio(masks, k, chunk=chunk), brute_reuse(masks, k)
    if math.isnan(expected):
        assert math.isnan(got)
    else:
        assert got == pytest.approx(expected, rel=1e-9)
    if s == 1:
        got2 = reuse_ratio(masks[0], k, chunk=chunk)
        assert (math.isnan(got2) and math.isnan(expected)) or got2 == pytest.approx(expected)


def test_reuse_ratio_known_values_and_errors() -> None:
    masks = torch.tensor([[1, 0, 0], [0, 1, 0], [1, 1, 0], [0, 0, 0], [0, 0, 1]], dtype=torch.bool)
    # k=1: t=1 {1} vs {0}: 0; t=2 {0,1} vs {1}: 1/2; t=3 empty: skipped; t=4 {2} vs {}: 0  -> 1/6
    assert reuse_ratio(masks, 1) == pytest.approx(1 / 6)
    # k=2: t=2 {0,1} vs {0,1}: 1; t=4 {2} vs {0,1}: 0 -> 1/2
    assert reuse_ratio(masks, 2) == pytest.approx(1 / 2)
    assert math.isnan(reuse_ratio(masks, 5))
    with pytest.raises(ValueError, match="k"):
        reuse_ratio(masks, 0)


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    n=st.integers(1, 15),
    m=st.integers(1, 8),
    p=st.floats(0.05, 0.95),
    chunk=st.integers(1, 7),
)
def test_coactivation_gap_matches_brute_force(seed: int, n: int, m: int, p: float, chunk: int) -> None:
    g = torch.Generator().manual_seed(seed)
    masks = torch.rand(n, m, generator=g) < p
    got, expected = coactivation_gap(masks, chunk=chunk), brute_gap(masks)
    if math.isnan(expected):
        assert math.isnan(got)
    else:
        assert got == pytest.approx(expected, abs=1e-12)


def test_coactivation_gap_known_values() -> None:
    # neurons 0 and 1 always fire together, 2 alone, 3 never (excluded): M = [[0,1,0],[1,0,0],[0,0,0]]
    masks = torch.tensor([[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0]], dtype=torch.bool)
    assert coactivation_gap(masks) == pytest.approx(2 / 3 - 2 / 9)
    # all neurons always together: M = 1 off the diagonal: gap = 1 - (m-1)/m
    assert coactivation_gap(torch.ones(4, 5, dtype=torch.bool)) == pytest.approx(1 / 5)
    assert math.isnan(coactivation_gap(torch.zeros(3, 4, dtype=torch.bool)))
