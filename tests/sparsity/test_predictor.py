"""The low-rank predictor and its training core, on synthetic data with known answers (no model needed)."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sparseinfer.sparsity.predictor import (
    LowRankPredictor,
    PredictorSet,
    default_rank,
    predictor_parameter_count,
    size_percent,
)
from sparseinfer.sparsity.predictor_train import (
    LabeledTokens,
    choose_score_threshold,
    evaluate,
    fit_predictor,
    pack_mask,
    split_sequences,
    unpack_mask,
)


def _random_predictor(d=12, m=20, r=3, hidden=None, seed=0):
    p = LowRankPredictor(d, m, r, hidden_activation=hidden)
    p.reset_parameters(torch.Generator().manual_seed(seed))
    return p.eval()


@settings(max_examples=30, deadline=None)
@given(n=st.integers(0, 7), m=st.integers(1, 30), seed=st.integers(0, 1000))
def test_pack_unpack_round_trip(n, m, seed):
    mask = torch.rand(n, m, generator=torch.Generator().manual_seed(seed)) < 0.3
    packed = pack_mask(mask)
    assert packed.dtype == torch.uint8 and packed.shape == (n, math.ceil(m / 8))
    assert torch.equal(unpack_mask(packed, m), mask)


@pytest.mark.parametrize("hidden", [None, "relu"])
def test_scores_follow_the_paper_formula(hidden):
    p = _random_predictor(hidden=hidden)
    x = torch.randn(5, 12)
    z = x @ p.w1.weight.T + p.w1.bias
    if hidden == "relu":
        z = z.clamp_min(0)
    expected = torch.sigmoid(z @ p.w2.weight.T + p.w2.bias)  # ŷ = sigmoid(W2 (W1 x + b1) + b2)
    with torch.no_grad():
        assert torch.allclose(p.probabilities(x), expected, atol=1e-6)
        assert torch.equal(p.predict(x, 0.3), p.probabilities(x) >= 0.3)
        top = p.top_k(x, 4)
        brute = torch.argsort(expected, dim=-1, descending=True)[:, :4]
        assert torch.equal(top.sort(-1).values, brute.sort(-1).values)
    with pytest.raises(ValueError, match="k must be"):
        p.top_k(x, 0)


def test_size_formula_and_default_rank():
    # A non-gated FFN of d=64, m=256 has 2·64·256 = 32768 weights; 6% of it is 1966 ≈ (64 + 256)·6.
    assert default_rank(64, 256, 32768) == 6
    assert predictor_parameter_count(64, 256, 6) == 320 * 6 + 6 + 256
    assert size_percent(64, 256, 6, 32768) == pytest.approx(100 * 2182 / 32768)
    # 7B Llama layer: d 4096, m 11008, gated (3·d·m)
    r = default_rank(4096, 11008, 3 * 4096 * 11008)
    assert abs((4096 + 11008) * r / (3 * 4096 * 11008) - 0.06) < 0.0005
    assert default_rank(4, 4, 10) == 1  # never 0


@pytest.mark.parametrize("bad", [0, -3])
def test_rank_must_be_positive(bad):
    with pytest.raises(ValueError, match="rank must be a positive integer"):
        LowRankPredictor(4, 8, bad)


def test_split_is_disjoint_covering_seeded():
    s = split_sequences(50, (0.8, 0.1, 0.1), seed=3)
    sets = [set(s[k]) for k in ("train", "validation", "test")]
    assert not (sets[0] & sets[1] or sets[0] & sets[2] or sets[1] & sets[2])
    assert set().union(*sets) == set(range(50))
    assert [len(x) for x in sets] == [40, 5, 5]
    assert s == split_sequences(50, (0.8, 0.1, 0.1), seed=3)
    assert s != split_sequences(50, (0.8, 0.1, 0.1), seed=4)
    with pytest.raises(ValueError, match="at least 3 calibration sequences"):
        split_sequences(2)
    with pytest.raises(ValueError, match="split must be"):
        split_sequences(10, (0.5, 0.5, 0.0))


def test_threshold_is_the_largest_reaching_the_target():
    p = _random_predictor(seed=1)
    x = torch.randn(40, 12, generator=torch.Generator().manual_seed(2))
    y = torch.rand(40, 20, generator=torch.Generator().manual_seed(3)) < 0.3
    data = LabeledTokens(x, pack_mask(y), 20)
    with torch.no_grad():
        s = p.probabilities(x)
    for target in (0.5, 0.9, 0.99, 1.0):
        t = choose_score_threshold(p, data, target)
        # brute force: every observed score is a candidate; keep those reaching the target, take the largest
        ok = [c for c in s.flatten().tolist() if ((s >= c) & y).sum() / y.sum() >= target]
        assert t == pytest.approx(max(ok), abs=0)
        assert evaluate(p, data, t).recall >= target


@pytest.mark.parametrize("bad", [0.0, -0.1, 1.01, float("nan")])
def test_recall_target_outside_unit_interval(bad):
    p = _random_predictor()
    data = LabeledTokens(torch.randn(4, 12), pack_mask(torch.ones(4, 20, dtype=torch.bool)), 20)
    with pytest.raises(ValueError, match=r"recall target must be in \(0, 1\]"):
        choose_score_threshold(p, data, bad)


def test_counts_against_brute_force():
    p = _random_predictor(seed=5)
    x = torch.randn(30, 12)
    y = torch.rand(30, 20) < 0.4
    c = evaluate(
        p, LabeledTokens(x, pack_mask(y), 20), 0.5, chunk=7
    )  # chunks of 7 tokens: exercise the seams
    with torch.no_grad():
        pred = p.probabilities(x) >= 0.5
    assert c.recall == pytest.approx(float((pred & y).sum() / y.sum()))
    assert c.precision == pytest.approx(float((pred & y).sum() / pred.sum()))
    assert c.predicted_sparsity == pytest.approx(float(1 - pred.float().mean()))
    assert c.true_sparsity == pytest.approx(float(1 - y.float().mean()))


def _low_rank_task(n, d=32, m=96, true_rank=4, seed=0):
    """Labels that are exactly a rank-4 linear threshold function of x, ~15% positive like a sparse FFN."""
    g = torch.Generator().manual_seed(seed)
    a, b = torch.randn(m, true_rank, generator=g), torch.randn(true_rank, d, generator=g)
    bias = torch.full((m,), -1.0 * math.sqrt(true_rank * d))  # shifts the positive rate down to ~15%

    def draw(k, s):
        x = torch.randn(k, d, generator=torch.Generator().manual_seed(s))
        return LabeledTokens(x, pack_mask(x @ b.T @ a.T + bias > 0), m)

    return draw(n, seed + 1), draw(n // 4, seed + 2), draw(n // 4, seed + 3)


def test_training_learns_a_low_rank_ground_truth():
    train, val, test = _low_rank_task(4000)
    rate = 1 - evaluate(_random_predictor(32, 96, 1), test, 2.0).true_sparsity
    assert 0.05 < rate < 0.3  # the task is sparse, as an FFN's activity is
    p, pos_weight, _ = fit_predictor(train, val, rank=8, epochs=15, lr=1e-2, batch_size=256, progress=False)
    assert pos_weight == pytest.approx((1 - rate) / rate, rel=0.15)
    t = choose_score_threshold(p, val, 0.99)
    c = evaluate(p, test, t)
    assert c.recall >= 0.97  # 0.99 on validation; held-out slack
    assert c.precision >= 0.7  # a random guess at this recall would have precision ≈ rate (< 0.3)
    assert c.predicted_sparsity > 0.6


def test_training_is_deterministic_given_the_seed():
    train, val, _ = _low_rank_task(600)
    p1, *_ = fit_predictor(train, val, rank=4, epochs=2, seed=7, progress=False)
    p2, *_ = fit_predictor(train, val, rank=4, epochs=2, seed=7, progress=False)
    p3, *_ = fit_predictor(train, val, rank=4, epochs=2, seed=8, progress=False)
    assert torch.equal(p1.w2.weight, p2.w2.weight)
    assert not torch.equal(p1.w2.weight, p3.w2.weight)


def test_state_round_trip_preserves_predictions():
    ps = PredictorSet(
        [_random_predictor(seed=i, hidden="relu") for i in range(3)], torch.tensor([0.1, 0.2, 0.3]), 0.95
    )
    tensors = ps.state_tensors()
    assert tensors["predictor.1.w1"].shape == (3, 12) and tensors["predictor.1.w2"].shape == (20, 3)
    assert tensors["predictor.1.b1"].shape == (3,) and tensors["predictor.1.b2"].shape == (20,)
    back = PredictorSet.from_state(tensors, ps.manifest())
    x = torch.randn(6, 12)
    for i in range(3):
        assert torch.equal(back.predict(i, x), ps.predict(i, x))
    assert back.recall_target == 0.95 and back.predictors[0].hidden_activation == "relu"
    del tensors["predictor.2.b2"]
    with pytest.raises(ValueError, match=r"predictor\.2\.b2"):
        PredictorSet.from_state(tensors, ps.manifest())
