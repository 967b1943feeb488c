"""The sparse FFN executor and the hybrid split, against the dense FFN formula of PAPER.md with the same mask.

The oracle is written here from the formula (h = σ(W_in x) [⊙ W_up x], FFN = W_out (h ⊙ mask)) with the
model's own activation functions, independent of the executor's tier/index bookkeeping.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from sparseinfer.bench.decode import ranked_unions
from sparseinfer.engine.hybrid import TieredFFN, make_tier
from sparseinfer.engine.sparse_ffn import LayerPredictor, SparseFFN
from sparseinfer.model.ffn import activation_fn
from sparseinfer.model.linear import EVERY_INPUT
from sparseinfer.model.step import ForwardStep
from sparseinfer.sparsity.neurons import active_mask

D, M = 48, 96
VARIANTS = [("relu2", False), ("relu", False), ("silu", True), ("fatrelu", True), ("drelu", True)]
THRESHOLD = 0.05  # FATReLU's


def weights(gated: bool, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    w_in = torch.randn(M, D, generator=g) / D**0.5
    w_up = torch.randn(M, D, generator=g) / D**0.5 if gated else None
    w_out = torch.randn(D, M, generator=g) / M**0.5
    return w_in, w_up, w_out


def dense_masked(x, w_in, w_up, w_out, mask, activation):
    h = activation_fn(activation, THRESHOLD)(x @ w_in.t())  # (N, M)
    if w_up is not None:
        up = x @ w_up.t()
        h = h * (F.relu(up) if activation == "drelu" else up)
    return (h * mask.to(h.dtype)) @ w_out.t()  # (N, D)


def tiered(w_in, w_up, w_out, activation, hot_ids=None, rows_up_to=EVERY_INPUT):
    cpu = torch.device("cpu")
    if hot_ids is None:
        tiers = [make_tier(w_in, w_up, w_out, torch.arange(M), cpu, hot=True)]
    else:
        cold = torch.ones(M, dtype=torch.bool)
        cold[hot_ids] = False
        tiers = [
            make_tier(w_in, w_up, w_out, hot_ids, cpu, hot=True),
            make_tier(w_in, w_up, w_out, cold.nonzero().flatten(), cpu, hot=False),
        ]
    ffn = TieredFFN(tiers, M, cpu, activation, THRESHOLD)
    [(_, assign)] = ffn.dense_projections()  # as model.linear.use_row_kernels sets it
    assign(rows_up_to)
    return ffn


def random_mask(n, density, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, M, generator=g) < density


def union_of(mask):
    return mask.any(0).nonzero().flatten().to(torch.int32)


# rows_up_to 0: every input is "long", so torch's GEMMs take the unions that are big enough (_gemms_win)
@pytest.mark.parametrize("rows_up_to", [EVERY_INPUT, 0])
@pytest.mark.parametrize(("activation", "gated"), VARIANTS)
@pytest.mark.parametrize("crossover", [1.0, 0.0])  # sparse kernels / dense fallback
def test_executor_equals_dense_ffn_with_same_mask(activation, gated, crossover, rows_up_to):
    w_in, w_up, w_out = weights(gated)
    x = torch.randn(5, D, generator=torch.Generator().manual_seed(1))
    mask = random_mask(5, 0.2, seed=2)
    ffn = tiered(w_in, w_up, w_out, activation, rows_up_to=rows_up_to)
    out = ffn.forward(x, union_of(mask), mask, crossover)
    torch.testing.assert_close(
        out, dense_masked(x, w_in, w_up, w_out, mask, activation), rtol=1e-5, atol=1e-5
    )


@pytest.mark.parametrize("crossover", [1.0, 0.0])
def test_one_row_without_row_mask_uses_the_union(crossover):
    w_in, w_up, w_out = weights(True)
    x = torch.randn(1, D)
    mask = random_mask(1, 0.1, seed=3)
    out = tiered(w_in, w_up, w_out, "silu").forward(x, union_of(mask), None, crossover)
    torch.testing.assert_close(out, dense_masked(x, w_in, w_up, w_out, mask, "silu"), rtol=1e-5, atol=1e-5)


def test_long_inputs_over_big_unions_take_the_gemms(monkeypatch):
    w_in, w_up, w_out = weights(True)
    ffn = tiered(w_in, w_up, w_out, "silu", rows_up_to=2)
    assert not ffn._gemms_win(2, M, None)  # two rows: model.linear's kernels, not torch
    # 8 rows over the whole union each: 3 * union + 8 * union > 6.4 * M from 32 * M / 55 on
    first = 32 * M // 55 + 1
    assert not ffn._gemms_win(8, first - 1, None) and ffn._gemms_win(8, first, None)
    sparse_rows = torch.zeros(8, M, dtype=torch.bool)
    sparse_rows[:, : M // 10] = True  # few (row, neuron) pairs over the same big union
    assert not ffn._gemms_win(8, first, sparse_rows)
    monkeypatch.setattr(TieredFFN, "_sparse", lambda *a: pytest.fail("sparse kernel used"))
    x = torch.randn(8, D)
    mask = random_mask(8, 0.5, seed=8)
    out = ffn.forward(x, union_of(mask), mask, 1.0)
    torch.testing.assert_close(out, dense_masked(x, w_in, w_up, w_out, mask, "silu"), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("hot_share", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("crossover", [1.0, 0.0])
def test_hybrid_equals_single_tier(hot_share, crossover):
    w_in, w_up, w_out = weights(True, seed=4)
    hot_ids = (
        torch.randperm(M, generator=torch.Generator().manual_seed(5))[: round(hot_share * M)].sort().values
    )
    x = torch.randn(7, D)
    mask = random_mask(7, 0.15, seed=6)
    single = tiered(w_in, w_up, w_out, "fatrelu").forward(x, union_of(mask), mask, crossover)
    hybrid = tiered(w_in, w_up, w_out, "fatrelu", hot_ids)
    assert int(hybrid.hot_mask.sum()) == hot_ids.numel()
    torch.testing.assert_close(
        hybrid.forward(x, union_of(mask), mask, crossover), single, rtol=1e-5, atol=1e-6
    )


def test_empty_union_gives_zeros():
    w_in, w_up, w_out = weights(False)
    x = torch.randn(3, D)
    mask = torch.zeros(3, M, dtype=torch.bool)
    for ffn in (tiered(w_in, w_up, w_out, "relu2"), tiered(w_in, w_up, w_out, "relu2", torch.arange(10))):
        assert torch.equal(ffn.forward(x, union_of(mask), mask, 1.0), torch.zeros(3, D))


def test_true_mask_matches_the_active_neuron_definition():
    w_in, w_up, w_out = weights(True, seed=7)
    x = torch.randn(6, D)
    norms = torch.linalg.vector_norm(w_out, dim=0)
    h = activation_fn("silu")(x @ w_in.t()) * (x @ w_up.t())
    expected = active_mask(h, norms, 0.01)
    for hot in (None, torch.arange(0, M, 3)):
        assert torch.equal(tiered(w_in, w_up, w_out, "silu", hot).true_mask(x, 0.01), expected)


def test_mixed_modes_each_row_gets_its_own_set_and_counts_match_brute_force():
    """Rows in dense / oracle / predicted mode in one batch: each row's output is the dense FFN with its own
    mask, and the recorded per-row counts equal the brute-force counts."""
    w_in, w_up, w_out = weights(True, seed=8)
    eps = 0.02
    g = torch.Generator().manual_seed(9)
    r = 6
    predictor = LayerPredictor(
        torch.randn(r, D, generator=g),
        torch.zeros(r),
        torch.randn(M, r, generator=g),
        torch.full((M,), -1.0),
        0.3,
        None,
    )
    hot_ids = torch.arange(0, M, 4)
    ffn = SparseFFN(0, tiered(w_in, w_up, w_out, "silu", hot_ids), eps, predictor, crossover=1.0)
    B, T = 3, 2
    x = torch.randn(B, T, D, generator=g)
    modes = ("oracle", "predicted", "dense")
    ctx = ForwardStep.of(modes)
    out = ffn(x, ctx)

    xf = x.reshape(B * T, D)
    norms = torch.linalg.vector_norm(w_out, dim=0)
    h = activation_fn("silu")(xf @ w_in.t()) * (xf @ w_up.t())
    truth = active_mask(h, norms, eps)  # (N, M)
    predicted = predictor.scores(xf) > predictor.threshold
    own = torch.cat([truth[0:2], predicted[2:4], torch.ones(2, M, dtype=torch.bool)])  # rows by mode
    torch.testing.assert_close(
        out.reshape(B * T, D), dense_masked(xf, w_in, w_up, w_out, own, "silu"), rtol=1e-5, atol=1e-5
    )

    hot = torch.zeros(M, dtype=torch.bool)
    hot[hot_ids] = True
    counts = ctx.counts[0]
    for b in range(B):
        rows = own[b * T : (b + 1) * T]
        assert counts[b, 0] == rows.sum()  # selected
        assert counts[b, 1] == (rows & hot).sum()  # hot
        assert counts[b, 2] == rows.any(0).sum()  # union over the row's tokens
    assert ctx.measured[0] == (True, False, False)  # only the oracle row's mode measures the truth
    assert counts[0, 3] == truth[0:2].sum() and counts[0, 4] == truth[0:2].sum()


@pytest.mark.parametrize("t", [0.5, 0.9, 0.3, 1e-6, 0.999999, 1.0])
def test_predictor_threshold_moves_to_the_logit_scale(t):
    """The runtime rule logit > θ is the trained rule sigmoid(logit) ≥ t exactly, ties included: checked on
    the float32 logits next to θ and on a wide random spread."""
    p = LayerPredictor(torch.zeros(1, D), torch.zeros(1), torch.zeros(M, 1), torch.zeros(M), t, None)
    up, down = [torch.tensor(p.threshold)], [torch.tensor(p.threshold)]
    for _ in range(64):
        up.append(torch.nextafter(up[-1], torch.tensor(math.inf)))
        down.append(torch.nextafter(down[-1], torch.tensor(-math.inf)))
    spread = torch.randn(4096, generator=torch.Generator().manual_seed(0)) * 20
    logits = torch.cat([torch.stack(up + down), spread, torch.tensor([-math.inf, math.inf])])
    assert torch.equal(logits > p.threshold, torch.sigmoid(logits) >= t)
    if 0.01 <= t <= 0.99:  # where float32's sigmoid is fine-grained, within rounding of the exact logit
        assert abs(p.threshold - math.log(t / (1 - t))) < 1e-6 * max(1.0, abs(math.log(t / (1 - t))))
    assert LayerPredictor(*[torch.zeros(1)] * 4, 0.0, None).threshold == float("-inf")


# The unions `bench decode` times for its dense-fallback crossover: the firing neurons first, as a predictor
# ranks them (random unions of a FATReLU layer are mostly neurons the kernel skips).
def test_unions_take_the_strongest_neurons_first_and_rows_keep_their_own():
    w_in, w_up, w_out = weights(gated=True)
    ffn = tiered(w_in, w_up, w_out, "fatrelu", hot_ids=torch.arange(0, M, 3))  # two tiers
    x = torch.randn(3, w_in.shape[1], generator=torch.Generator().manual_seed(1))
    h = torch.nn.functional.threshold(x @ w_in.t(), 0.05, 0.0) * (x @ w_up.t())  # (3, M), FATReLU's h
    fires = h != 0
    strength = h.abs().amax(0)
    cases = ranked_unions(ffn, x, (0.1, 0.5, 1.0))
    for q, (union, mask) in zip((0.1, 0.5, 1.0), cases, strict=True):
        assert union.dtype == torch.int32 and union.numel() == round(q * M)
        assert torch.equal(union, union.sort().values)
        outside = torch.ones(M, dtype=torch.bool)
        outside[union.long()] = False
        if outside.any():  # every chosen neuron is at least as strong as every one left out
            assert strength[union.long()].min() >= strength[outside].max()
        assert torch.equal(mask[:, union.long()], fires[:, union.long()]) and not mask[:, outside].any()
        # The timed step computes the FFN of exactly those neurons, per row.
        got = ffn.forward(x, union, mask, 1.0)
        torch.testing.assert_close(
            got, dense_masked(x, w_in, w_up, w_out, mask, "fatrelu"), rtol=1e-4, atol=1e-5
        )


def test_one_row_has_no_mask():
    w_in, w_up, w_out = weights(gated=False)
    ffn = tiered(w_in, w_up, w_out, "relu2")
    [(union, mask)] = ranked_unions(ffn, torch.randn(1, w_in.shape[1]), (0.25,))
    assert mask is None and union.numel() == round(0.25 * M)


def test_predictor_hands_inputs_longer_than_rows_up_to_to_torch(monkeypatch):
    import sparseinfer.engine.sparse_ffn as sf

    g = torch.Generator().manual_seed(11)
    parts = [torch.randn(6, D, generator=g), torch.randn(6, generator=g), torch.randn(M, 6, generator=g)]
    w1, b1, w2 = (t.bfloat16() for t in parts)
    predictor = LayerPredictor(w1, b1, w2, torch.zeros(M).bfloat16(), 0.3, "relu")
    sites = list(predictor.dense_projections())
    assert [w.shape for w, _ in sites] == [w1.shape, w2.shape]
    for _, assign in sites:  # as model.linear.use_row_kernels sets them
        assign(2)
    ours = []
    real = sf.ops.linear
    monkeypatch.setattr(sf.ops, "linear", lambda x, *a: ours.append(x.shape[0]) or real(x, *a))
    for n in (1, 2, 8):
        x = torch.randn(n, D, generator=g).bfloat16()
        want = F.relu(x.float() @ w1.float().t() + b1.float()) @ w2.float().t()
        got = predictor.scores(x).float()
        assert (got - want).norm() <= 1e-2 * want.norm()  # bf16 weights, activations and outputs
    assert ours == [1, 1, 2, 2]  # both projections of the 1- and 2-row inputs; the 8-row one went to torch
