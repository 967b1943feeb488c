"""sparseinfer::linear (the predictors' projections) against reference.linear, on every CPU path."""

import pytest
import torch

from sparseinfer import ops, reference

TOL = {torch.float32: 2e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    ("B", "d", "k"),
    [(1, 1, 1), (1, 37, 19), (1, 300, 67), (3, 64, 130), (4, 300, 67), (5, 129, 7), (32, 33, 65)],
)
@pytest.mark.parametrize("with_bias", [False, True])
def test_matches_reference(isa, dtype, B, d, k, with_bias):
    gen = torch.Generator().manual_seed(B * d + k)
    x = torch.randn(B, d, generator=gen).to(dtype)
    w = (torch.randn(k, d, generator=gen) / d**0.5).to(dtype)
    b = torch.randn(k, generator=gen).to(dtype) if with_bias else None
    got = ops.linear(x, w, b)
    assert got.shape == (B, k) and got.dtype == dtype
    torch.testing.assert_close(
        got.float(), reference.linear(x, w, b).float(), rtol=TOL[dtype], atol=TOL[dtype]
    )


def test_threads_give_identical_bits(isa):
    x, w = torch.randn(6, 300).bfloat16(), torch.randn(500, 300).bfloat16()
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = ops.linear(x, w)
        torch.set_num_threads(4)
        many = ops.linear(x, w)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one, many)


def test_row_result_independent_of_batch(isa):
    """Each row's output equals that row computed alone, bit for bit, whatever the batch size."""
    x, w = torch.randn(7, 77).bfloat16(), torch.randn(50, 77).bfloat16()
    batch = ops.linear(x, w)
    for b in range(7):
        assert torch.equal(batch[b : b + 1], ops.linear(x[b : b + 1], w)), b


@pytest.mark.parametrize("shape", [(77,), (2, 3, 77), (1, 1, 77), (0, 4, 77)])
def test_any_leading_shape(isa, shape):
    """x (..., d) -> (..., k), each row as it is computed in a (B, d) call, bit for bit."""
    x, w, b = torch.randn(shape).bfloat16(), torch.randn(50, 77).bfloat16(), torch.randn(50).bfloat16()
    got = ops.linear(x, w, b)
    assert got.shape == (*shape[:-1], 50)
    assert torch.equal(got.reshape(-1, 50), ops.linear(x.reshape(-1, 77), w, b))


@pytest.mark.parametrize(
    ("x", "w", "b", "message"),
    [
        (torch.tensor(1.0), torch.randn(3, 8), None, "x must have shape"),
        (torch.randn(2, 8), torch.randn(3, 7), None, "weight must have shape"),
        (torch.randn(2, 8), torch.randn(8, 3).t(), None, "weight must be contiguous"),
        (torch.randn(2, 8), torch.randn(3, 8).bfloat16(), None, "weight dtype"),
        (torch.randn(2, 8), torch.randn(3, 8), torch.randn(4), "bias must be"),
    ],
)
def test_rejects_bad_arguments(x, w, b, message):
    with pytest.raises(RuntimeError, match=message):
        ops.linear(x, w, b)


def test_opcheck():
    x, w, b = torch.randn(3, 20).bfloat16(), torch.randn(9, 20).bfloat16(), torch.randn(9).bfloat16()
    torch.library.opcheck(torch.ops.sparseinfer.linear.default, (x, w, b))
    torch.library.opcheck(torch.ops.sparseinfer.linear.default, (x, w, None))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_matches_reference():
    x, w, b = torch.randn(3, 70), torch.randn(9, 70), torch.randn(9)
    got = ops.linear(x.cuda(), w.cuda(), b.cuda()).cpu()
    torch.testing.assert_close(got, reference.linear(x, w, b), rtol=1e-4, atol=1e-4)
