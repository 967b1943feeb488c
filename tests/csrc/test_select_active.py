"""sparseinfer::select_active against reference.select_active: threshold / top-k rows, the ascending union."""

import pytest
import torch

from sparseinfer import ops, reference


def _scores(B, m, dtype=torch.float32, seed=0):
    # A permutation keeps scores distinct (top-k has no ties to break), also after rounding to bf16/fp16.
    gen = torch.Generator().manual_seed(seed)
    return (
        torch.stack([torch.randperm(m, generator=gen) for _ in range(B)]).float().sub(m / 2).div(8).to(dtype)
    )


def _check(scores, threshold, top_k):
    mask, union = ops.select_active(scores, threshold, top_k)
    want_mask, want_union = reference.select_active(scores, threshold, top_k)
    assert mask.dtype == torch.bool and union.dtype == torch.int32
    assert torch.equal(mask, want_mask)
    assert torch.equal(union, want_union)
    return mask, union


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("B", "m"), [(1, 1), (1, 13), (3, 100), (32, 257), (17, 1001)])
@pytest.mark.parametrize("threshold", [-1.0, 0.0, 2.5])
def test_threshold_matches_reference(dtype, B, m, threshold):
    _check(_scores(B, m, dtype, seed=B * m), threshold, 0)


@pytest.mark.parametrize(("B", "m", "k"), [(1, 10, 1), (4, 100, 7), (32, 257, 50), (3, 20, 20), (2, 5, 9)])
def test_top_k_matches_reference(B, m, k):
    mask, _ = _check(_scores(B, m, seed=k), 1e9, k)  # the threshold is ignored when top_k > 0
    assert (mask.sum(1) == min(k, m)).all()


def test_union_is_ascending_and_exact():
    scores = torch.full((3, 10), -1.0)
    scores[0, 7] = scores[1, 2] = scores[2, 7] = scores[2, 9] = 1.0
    mask, union = _check(scores, 0.0, 0)
    assert union.tolist() == [2, 7, 9]
    assert mask.sum().item() == 4


def test_empty_and_full():
    scores = _scores(4, 30)
    assert ops.select_active(scores, 1e9, 0)[1].numel() == 0
    assert ops.select_active(scores, -1e9, 0)[1].tolist() == list(range(30))
    mask, union = ops.select_active(torch.empty(0, 30), 0.0, 0)
    assert mask.shape == (0, 30) and union.numel() == 0


def test_top_k_ties_go_to_lower_index():
    _, union = ops.select_active(torch.tensor([[1.0, 2.0, 2.0, 2.0, 0.0]]), 0.0, 2)
    assert union.tolist() == [1, 2]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_top_k_many_ties_and_nan_match_reference(dtype):
    """Scores from a handful of values (most of them tie) plus NaNs: the kernel and the oracle must agree on
    the documented rule (ties to the lower index, NaN largest), not merely on tie-free inputs."""
    gen = torch.Generator().manual_seed(3)
    scores = torch.randint(0, 4, (9, 211), generator=gen).float()  # (9, 211)
    scores[torch.rand(9, 211, generator=gen) < 0.05] = float("nan")
    for k in (1, 5, 60, 211):
        _check(scores.to(dtype), 0.0, k)


def test_non_contiguous_scores():
    scores = _scores(6, 40).t().contiguous().t()  # (6, 40), column-major
    assert not scores.is_contiguous()
    _check(scores, 0.5, 0)
    _check(scores, 0.0, 3)


@pytest.mark.parametrize(
    ("scores", "top_k", "message"),
    [
        (torch.randn(10), 0, "scores must have shape"),
        (torch.randn(2, 10, dtype=torch.float64), 0, "scores must be float32"),
        (torch.randn(2, 10), -1, "top_k must be >= 0"),
    ],
)
def test_rejects_bad_arguments(scores, top_k, message):
    with pytest.raises(RuntimeError, match=message):
        ops.select_active(scores, 0.0, top_k)


def test_opcheck():
    scores = _scores(3, 50)
    # The union's length depends on the data, so the fake kernel uses a dynamic size: skip the
    # static-shape fake-tensor comparison, keep the schema / autograd registration checks.
    torch.library.opcheck(
        torch.ops.sparseinfer.select_active.default,
        (scores, 0.0, 0),
        test_utils=("test_schema", "test_autograd_registration"),
    )
    torch.library.opcheck(
        torch.ops.sparseinfer.select_active.default,
        (scores, 0.0, 5),
        test_utils=("test_schema", "test_autograd_registration"),
    )


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("B", "m", "top_k"), [(1, 11008, 0), (5, 1001, 0), (1, 11008, 1100), (16, 777, 40)])
def test_cuda_matches_reference(dtype, B, m, top_k):
    scores = _scores(B, m, dtype, seed=m)
    mask, union = ops.select_active(scores.cuda(), 0.5, top_k)
    want_mask, want_union = reference.select_active(scores, 0.5, top_k)
    assert torch.equal(mask.cpu(), want_mask) and torch.equal(union.cpu(), want_union)
