"""sparseinfer::rms_norm against its oracle in reference.py, plus the dispatcher's own checks (opcheck)."""

import pytest
import torch

from sparseinfer import ops, reference

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SHAPES = [(1, 1), (1, 7), (3, 64), (5, 129), (2, 3, 1000), (17, 4096)]


def _inputs(shape: tuple[int, ...], dtype: torch.dtype, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=gen) * 3).to(dtype)
    w = torch.randn(shape[-1], generator=gen).to(dtype)
    return x, w


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_rms_norm_matches_reference(shape: tuple[int, ...], dtype: torch.dtype) -> None:
    x, w = _inputs(shape, dtype)
    got = ops.rms_norm(x, w, 1e-5)
    want = reference.rms_norm(x, w, 1e-5)
    assert got.dtype == dtype and got.shape == x.shape
    # fp32 sums may associate differently (threads, vectorisation); low precision is rounded from
    # near-identical fp32 values, so allow one unit in the last place there.
    tol = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-3}[dtype]
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)


def test_rms_norm_matches_transformers_llama_rmsnorm() -> None:
    transformers_llama = pytest.importorskip("transformers.models.llama.modeling_llama")
    norm = transformers_llama.LlamaRMSNorm(96, eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(96))
    x = torch.randn(4, 96)
    with torch.no_grad():
        torch.testing.assert_close(ops.rms_norm(x, norm.weight, 1e-6), norm(x), rtol=1e-5, atol=1e-5)


def test_rms_norm_non_contiguous_input() -> None:
    x, w = _inputs((8, 64), torch.float32)
    xt = x.t().contiguous().t()  # same values, column-major strides
    assert not xt.is_contiguous()
    torch.testing.assert_close(ops.rms_norm(xt, w, 1e-6), reference.rms_norm(x, w, 1e-6))


def test_rms_norm_empty_batch() -> None:
    x, w = _inputs((0, 16), torch.float32)
    assert ops.rms_norm(x, w, 1e-6).shape == (0, 16)


def test_rms_norm_many_threads_is_deterministic() -> None:
    x, w = _inputs((257, 513), torch.float32)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = ops.rms_norm(x, w, 1e-6)
        torch.set_num_threads(8)
        multi = ops.rms_norm(x, w, 1e-6)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(single, multi)  # rows are independent: threading must not change a bit


@pytest.mark.parametrize(
    ("x_shape", "w_shape", "w_dtype", "message"),
    [
        ((4, 8), (7,), torch.float32, "weight must have shape"),
        ((4, 8), (8,), torch.float16, "dtype"),
    ],
)
def test_rms_norm_rejects_bad_arguments(x_shape, w_shape, w_dtype, message) -> None:
    x = torch.randn(x_shape)
    w = torch.randn(w_shape).to(w_dtype)
    with pytest.raises(RuntimeError, match=message):
        ops.rms_norm(x, w, 1e-6)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_opcheck(dtype: torch.dtype) -> None:
    x, w = _inputs((3, 40), dtype)
    torch.library.opcheck(torch.ops.sparseinfer.rms_norm.default, (x, w, 1e-6))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_cuda_matches_cpu(dtype: torch.dtype) -> None:
    x, w = _inputs((9, 4099), dtype)
    got = ops.rms_norm(x.cuda(), w.cuda(), 1e-6).cpu()
    tol = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-3}[dtype]
    torch.testing.assert_close(got, reference.rms_norm(x, w, 1e-6), rtol=tol, atol=tol)
