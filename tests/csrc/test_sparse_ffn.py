"""sparseinfer::sparse_ffn against reference.sparse_ffn, on every CPU path this machine has
(SPARSEINFER_CPU_ISA=scalar|avx2|avx512), plus opcheck, threading determinism and argument errors."""

import concurrent.futures

import pytest
import torch

from sparseinfer import ops, reference

ACTIVATIONS = ["relu", "relu2", "silu", "fatrelu", "drelu"]
TOL = {torch.float32: 2e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}


def _case(B, d, m, dtype, gated=True, density=0.5, seed=0, masked=False):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(B, d, generator=gen).to(dtype)
    w_in = (torch.randn(m, d, generator=gen) / d**0.5).to(dtype)
    w_up = (torch.randn(m, d, generator=gen) / d**0.5).to(dtype) if gated else None
    w_out_t = (torch.randn(m, d, generator=gen) / m**0.5).to(dtype)
    keep = torch.rand(m, generator=gen) < density
    active = keep.nonzero().flatten().to(torch.int32)
    row_mask = torch.rand(B, m, generator=gen) < 0.6 if masked else None
    return x, w_in, w_up, w_out_t, active, row_mask


def _check(args, activation, threshold=0.1):
    x = args[0]
    got = ops.sparse_ffn(*args, activation, threshold)
    want = reference.sparse_ffn(*args, activation, threshold)
    assert got.shape == x.shape and got.dtype == x.dtype
    scale = max(1.0, want.float().abs().max().item())
    tol = TOL[x.dtype]
    torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol * scale)


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("gated", [True, False])
@pytest.mark.parametrize("masked", [False, True])
def test_matches_reference_all_activations(isa, activation, gated, masked):
    if activation == "drelu" and not gated:
        pytest.skip("dReLU is a gated variant")
    _check(_case(3, 45, 77, torch.float32, gated=gated, masked=masked), activation)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    ("B", "d", "m"), [(1, 1, 1), (1, 7, 13), (1, 300, 97), (2, 33, 65), (5, 129, 300), (32, 61, 97)]
)
def test_matches_reference_odd_sizes(isa, dtype, B, d, m):
    _check(_case(B, d, m, dtype, masked=B > 1, seed=B + d), "relu")


@pytest.mark.parametrize("B", [1, 2, 3, 4, 5, 8, 9, 16, 31, 32])
def test_batch_sizes(isa, B):
    _check(_case(B, 70, 90, torch.bfloat16, masked=True, seed=B), "silu")


@pytest.mark.parametrize("density", [0.0, 1.0])
def test_empty_and_full_active_sets(isa, density):
    args = _case(4, 40, 50, torch.float32, density=density)
    assert args[4].numel() == (0 if density == 0.0 else 50)
    _check(args, "relu2")
    if density == 0.0:
        assert torch.count_nonzero(ops.sparse_ffn(*args, "relu2", 0.0)) == 0


def test_all_false_row_mask_gives_zero_rows(isa):
    x, w_in, w_up, w_out_t, active, _ = _case(3, 40, 50, torch.float32, density=1.0)
    row_mask = torch.ones(3, 50, dtype=torch.bool)
    row_mask[1] = False
    out = ops.sparse_ffn(x, w_in, w_up, w_out_t, active, row_mask, "silu", 0.0)
    assert torch.count_nonzero(out[1]) == 0 and torch.count_nonzero(out[0]) > 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_row_result_independent_of_batch_mates(isa, dtype):
    """A row's output with its own mask equals computing that row alone, bit for bit (the batching
    contract: a request's tokens must not depend on what else is in the batch)."""
    x, w_in, w_up, w_out_t, active, row_mask = _case(6, 77, 120, dtype, density=1.0, masked=True)
    batch = ops.sparse_ffn(x, w_in, w_up, w_out_t, active, row_mask, "relu", 0.0)
    for b in range(6):
        own = row_mask[b].nonzero().flatten().to(torch.int32)
        alone = ops.sparse_ffn(x[b : b + 1], w_in, w_up, w_out_t, own, None, "relu", 0.0)
        assert torch.equal(batch[b : b + 1], alone), b


def test_equals_dense_ffn_when_everything_active(isa):
    x, w_in, w_up, w_out_t, active, _ = _case(2, 48, 64, torch.float32, density=1.0)
    dense = (torch.nn.functional.silu(x @ w_in.t()) * (x @ w_up.t())) @ w_out_t
    got = ops.sparse_ffn(x, w_in, w_up, w_out_t, active, None, "silu", 0.0)
    torch.testing.assert_close(got, dense, rtol=1e-4, atol=1e-5)


def test_fatrelu_threshold_is_used(isa):
    args = _case(2, 32, 40, torch.float32, density=1.0)
    low, high = ops.sparse_ffn(*args, "fatrelu", -10.0), ops.sparse_ffn(*args, "fatrelu", 10.0)
    assert torch.count_nonzero(high) == 0 and torch.count_nonzero(low) > 0
    _check(args, "fatrelu", threshold=0.05)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_threads_give_identical_bits(isa, dtype):
    args = _case(7, 1000, 600, dtype, masked=True, density=0.4)
    before = torch.get_num_threads()
    try:
        results = []
        for threads in (1, 2, 3, 8):
            torch.set_num_threads(threads)
            results.append(ops.sparse_ffn(*args, "relu", 0.0))
    finally:
        torch.set_num_threads(before)
    for r in results[1:]:
        assert torch.equal(results[0], r)


def test_concurrent_callers_get_their_own_results(isa):
    """Several Python threads calling the op at once (the hybrid engine's CPU tier runs beside other work):
    each call's work hand-out is its own, so every result equals the single-threaded one."""
    cases = [_case(3, 200, 300, torch.bfloat16, masked=True, seed=s) for s in range(4)]
    want = [ops.sparse_ffn(*c, "relu", 0.0) for c in cases]
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        for _ in range(3):
            got = list(pool.map(lambda c: ops.sparse_ffn(*c, "relu", 0.0), cases))
            for g, w in zip(got, want, strict=True):
                assert torch.equal(g, w)


def test_non_contiguous_x_and_mask(isa):
    x, w_in, w_up, w_out_t, active, row_mask = _case(4, 30, 40, torch.float32, masked=True)
    xt = x.t().contiguous().t()
    mt = row_mask.t().contiguous().t()
    assert not xt.is_contiguous() and not mt.is_contiguous()
    got = ops.sparse_ffn(xt, w_in, w_up, w_out_t, active, mt, "relu", 0.0)
    torch.testing.assert_close(
        got, reference.sparse_ffn(x, w_in, w_up, w_out_t, active, row_mask, "relu", 0.0)
    )


def _bad(field):
    x, w_in, w_up, w_out_t, active, row_mask = _case(2, 8, 10, torch.float32, density=1.0, masked=True)
    args = dict(x=x, w_in=w_in, w_up=w_up, w_out_t=w_out_t, active=active, row_mask=row_mask)
    args.update(field)
    return args


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"x": torch.randn(8)}, "x must have shape"),
        ({"x": torch.randn(2, 8, dtype=torch.float64)}, "x must be float32"),
        ({"w_in": torch.randn(10, 9)}, "w_in must have shape"),
        ({"w_up": torch.randn(10, 8).to(torch.bfloat16)}, "w_up dtype"),
        ({"w_out_t": torch.randn(8, 10).t()}, "w_out_t must be contiguous"),
        ({"w_out_t": torch.randn(11, 8)}, "w_out_t must have shape"),
        ({"active": torch.tensor([0, 3], dtype=torch.int64)}, "active must be a 1-D int32"),
        ({"active": torch.tensor([0, 10], dtype=torch.int32)}, r"active\[1\] = 10 is out of range"),
        ({"active": torch.tensor([-1], dtype=torch.int32)}, "out of range"),
        ({"row_mask": torch.ones(2, 9, dtype=torch.bool)}, "row_mask must be bool of shape"),
        ({"row_mask": torch.ones(2, 10)}, "row_mask must be bool"),
    ],
)
def test_rejects_bad_arguments(change, message):
    a = _bad(change)
    with pytest.raises(RuntimeError, match=message):
        ops.sparse_ffn(a["x"], a["w_in"], a["w_up"], a["w_out_t"], a["active"], a["row_mask"], "relu", 0.0)


def test_rejects_unknown_activation():
    a = _bad({})
    with pytest.raises(RuntimeError, match="activation must be one of"):
        ops.sparse_ffn(a["x"], a["w_in"], a["w_up"], a["w_out_t"], a["active"], None, "gelu", 0.0)


def test_rejects_unknown_isa(monkeypatch):
    monkeypatch.setenv("SPARSEINFER_CPU_ISA", "sse9")
    a = _bad({})
    with pytest.raises(RuntimeError, match="SPARSEINFER_CPU_ISA must be"):
        ops.sparse_ffn(a["x"], a["w_in"], a["w_up"], a["w_out_t"], a["active"], None, "relu", 0.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("gated", [True, False])
def test_opcheck(dtype, gated):
    x, w_in, w_up, w_out_t, active, row_mask = _case(3, 24, 30, dtype, gated=gated, masked=True)
    args = (x, w_in, w_up, w_out_t, active, row_mask, "relu", 0.0)
    torch.library.opcheck(torch.ops.sparseinfer.sparse_ffn.default, args)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize(("B", "masked"), [(1, False), (5, True), (32, True)])
def test_cuda_matches_reference(dtype, activation, B, masked):
    args = _case(B, 4099, 1031, dtype, masked=masked, density=0.3, seed=B)
    cuda_args = [a.cuda() if isinstance(a, torch.Tensor) else a for a in args]
    got = ops.sparse_ffn(*cuda_args, activation, 0.1).cpu()
    want = reference.sparse_ffn(*args, activation, 0.1)
    tol = TOL[dtype]
    scale = max(1.0, want.float().abs().max().item())
    torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol * scale)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_non_gated_and_empty_active():
    x, w_in, _, w_out_t, active, row_mask = (
        a.cuda() if a is not None else None
        for a in _case(4, 257, 300, torch.bfloat16, gated=False, masked=True)
    )
    out = ops.sparse_ffn(x, w_in, None, w_out_t, active, row_mask, "relu2", 0.0)
    want = reference.sparse_ffn(
        x.cpu(), w_in.cpu(), None, w_out_t.cpu(), active.cpu(), row_mask.cpu(), "relu2", 0.0
    )
    torch.testing.assert_close(out.cpu().float(), want.float(), rtol=2e-2, atol=2e-2)
    empty = torch.empty(0, dtype=torch.int32, device="cuda")
    assert torch.count_nonzero(ops.sparse_ffn(x, w_in, None, w_out_t, empty, None, "relu", 0.0)) == 0
    torch.library.opcheck(
        torch.ops.sparseinfer.sparse_ffn.default, (x, w_in, None, w_out_t, active, row_mask, "relu2", 0.0)
    )
