"""The block-quantized formats (ggml's Q8_0 and Q4_0) and the kernels over them, on every CPU path this
machine has: quantize byte for byte against ggml's own reference quantizer (the gguf package) and
reference.quantize; linear and sparse_ffn with quantized weights against reference.py (dequantize, then the
fp32 math against x's Q8_0 quantization) over odd sizes, batch 1..32, empty and full active sets; opcheck;
argument errors."""

import numpy as np
import pytest
import torch

from sparseinfer import ops, reference

FORMATS = ["q8_0", "q4_0"]
LAYOUTS = [*FORMATS, "q8_0_i8", "q4_0_i8"]  # plain rows, and the same blocks interleaved for dot products


def _weights(rows, d, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    scale = torch.rand(rows, 1, generator=g) * 4 + 0.01  # rows of very different magnitudes
    w = torch.randn(rows, d, generator=g) * scale / d**0.5
    if rows > 2:
        w[1, :32] = 0.0  # an all-zero block: scale 0
        w[2, 5] = 50.0  # one outlier dominating its block
    return w.to(dtype)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize(("rows", "d"), [(1, 32), (7, 96), (50, 256), (3, 4096)])
def test_quantize_is_ggml_byte_for_byte(fmt, rows, d):
    gguf = pytest.importorskip("gguf")
    w = _weights(rows, d, seed=rows + d)
    qtype = {"q8_0": gguf.GGMLQuantizationType.Q8_0, "q4_0": gguf.GGMLQuantizationType.Q4_0}[fmt]
    ours = ops.quantize(w, fmt)
    assert ours.dtype == torch.uint8 and ours.shape == (rows, d // 32 * ops.BLOCK_BYTES[fmt])
    assert np.array_equal(ours.numpy(), gguf.quants.quantize(w.numpy(), qtype))
    assert torch.equal(ours, reference.quantize(w, fmt))
    assert np.array_equal(ops.dequantize(ours, fmt).numpy(), gguf.quants.dequantize(ours.numpy(), qtype))


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("d", [32, 256, 288, 4096, 4128])
def test_interleaved_rows_hold_the_same_blocks(fmt, d):
    """The _i8 layout moves bytes within a row (runs of 8 blocks; the tail stays plain): the same bytes,
    the same weights, and reference.interleave is its independent spelling."""
    w = _weights(5, d)
    plain, inter = ops.quantize(w, fmt), ops.quantize(w, fmt + "_i8")
    assert inter.shape == plain.shape
    assert torch.equal(inter, reference.interleave(plain, fmt))
    assert torch.equal(reference.deinterleave(inter, fmt), plain)
    assert torch.equal(torch.sort(inter, 1).values, torch.sort(plain, 1).values)
    assert torch.equal(ops.dequantize(inter, fmt + "_i8"), ops.dequantize(plain, fmt))


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_quantize_takes_half_precision(fmt, dtype):
    w = _weights(9, 64, dtype=dtype)
    assert torch.equal(ops.quantize(w, fmt), reference.quantize(w.float(), fmt))


@pytest.mark.parametrize("fmt", FORMATS)
def test_round_trip_error_is_bounded(fmt):
    """Half a step of rounding (Q4_0: a whole step at the clamped end of its range), plus the fp16 rounding
    of the stored scale (relative 2^-11 of the block's largest value)."""
    w = _weights(64, 512)
    back = ops.dequantize(ops.quantize(w, fmt), fmt)
    amax = w.reshape(64, -1, 32).abs().amax(-1, keepdim=True)  # per-block largest magnitude
    steps = 0.5 * amax / 127 if fmt == "q8_0" else amax / 8
    err = (back - w).reshape(64, -1, 32).abs()
    assert bool((err <= steps + amax * 2.0**-11 + 1e-9).all())


def _check_linear(x, q, fmt, bias=None):
    got = ops.linear(x, q, bias, fmt)
    want = reference.linear(x, q, bias, fmt)
    assert got.shape == want.shape and got.dtype == x.dtype
    scale = max(1.0, want.float().abs().max().item())
    tol = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}[x.dtype]
    torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol * scale)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize(
    ("B", "k", "d"), [(1, 1, 32), (1, 37, 64), (2, 5, 96), (3, 129, 160), (32, 17, 4096)]
)
def test_linear_matches_reference(isa, fmt, B, k, d):
    q = ops.quantize(_weights(k, d, seed=k), fmt)
    x = torch.randn(B, d, generator=torch.Generator().manual_seed(B + d))
    _check_linear(x, q, fmt)


@pytest.mark.parametrize("fmt", LAYOUTS)
@pytest.mark.parametrize("B", [1, 2, 3, 4, 5, 8, 9, 16, 31, 32])
def test_linear_every_batch_size_and_dtype(isa, fmt, B):
    q = ops.quantize(_weights(40, 288, seed=B), fmt)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        x = torch.randn(B, 288, generator=torch.Generator().manual_seed(B)).to(dtype)
        bias = torch.randn(40).to(dtype)
        _check_linear(x, q, fmt, bias)


@pytest.mark.parametrize("fmt", LAYOUTS)
def test_linear_rows_are_batch_independent(isa, fmt):
    q = ops.quantize(_weights(30, 288), fmt)
    x = torch.randn(9, 288)
    batch = ops.linear(x, q, None, fmt)
    for b in range(9):
        assert torch.equal(batch[b : b + 1], ops.linear(x[b : b + 1], q, None, fmt))


@pytest.mark.parametrize("fmt", LAYOUTS)
@pytest.mark.parametrize("threads", [1, 2])
def test_linear_long_calls_at_batch_one(isa, fmt, threads):
    # Hundreds of rows per kernel call, not a multiple of 4 (the AVX-512 batch-1 GEMV splits a call's
    # rows into 4 streams and does the last few alone), rows of one full run plus tail blocks: each
    # output still matches the reference and the same row computed in a batch.
    q = ops.quantize(_weights(1003, 288, seed=3), fmt)
    x = torch.randn(5, 288, generator=torch.Generator().manual_seed(5))
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        one = torch.cat([ops.linear(x[b : b + 1], q, None, fmt) for b in range(5)])
        batch = ops.linear(x, q, None, fmt)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one, batch)
    _check_linear(x, q, fmt)


def _ffn(B, d, m, fmt, gated, density, masked, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, d, generator=g).to(dtype)
    w_in = ops.quantize(torch.randn(m, d, generator=g) / d**0.5, fmt)
    w_up = ops.quantize(torch.randn(m, d, generator=g) / d**0.5, fmt) if gated else None
    w_out_t = ops.quantize(torch.randn(m, d, generator=g) / m**0.5, fmt.removesuffix("_i8"))  # always plain
    active = (torch.rand(m, generator=g) < density).nonzero().flatten().to(torch.int32)
    row_mask = torch.rand(B, m, generator=g) < 0.6 if masked else None
    return x, w_in, w_up, w_out_t, active, row_mask


def _check_ffn(args, activation, fmt, threshold=0.1):
    got = ops.sparse_ffn(*args, activation, threshold, fmt)
    want = reference.sparse_ffn(*args, activation, threshold, fmt)
    x = args[0]
    assert got.shape == x.shape and got.dtype == x.dtype
    scale = max(1.0, want.float().abs().max().item())
    tol = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}[x.dtype]
    torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol * scale)


@pytest.mark.parametrize("fmt", LAYOUTS)
@pytest.mark.parametrize("activation", ["relu", "relu2", "silu", "fatrelu", "drelu"])
@pytest.mark.parametrize("gated", [True, False])
def test_sparse_ffn_matches_reference(isa, fmt, activation, gated):
    if activation == "drelu" and not gated:
        pytest.skip("dReLU is a gated variant")
    _check_ffn(_ffn(3, 96, 77, fmt, gated, 0.5, masked=True), activation, fmt)


@pytest.mark.parametrize("fmt", LAYOUTS)
@pytest.mark.parametrize(
    ("B", "d", "m"), [(1, 32, 1), (1, 64, 13), (2, 160, 65), (5, 544, 300), (32, 96, 97)]
)
def test_sparse_ffn_odd_sizes(isa, fmt, B, d, m):
    for dtype in (torch.float32, torch.bfloat16):
        _check_ffn(_ffn(B, d, m, fmt, True, 0.4, masked=B > 1, seed=B + m, dtype=dtype), "relu", fmt)


@pytest.mark.parametrize("fmt", LAYOUTS)
@pytest.mark.parametrize("activation", ["relu", "silu", "fatrelu"])
@pytest.mark.parametrize("gated", [True, False])
@pytest.mark.parametrize("masked", [False, True])
def test_sparse_ffn_batch_one_equals_its_row_in_a_batch(isa, fmt, activation, gated, masked):
    # At batch 1 the kernel computes four neurons' gate (then up) rows together, in chunks of 32
    # neurons; a batch goes one neuron at a time. ~200 active neurons (groups of four and a remainder,
    # several chunks), rows of two full interleaved runs and a tail block, gates that are exactly zero
    # (no up row read) and masked-off neurons: each row alone equals its row in the batch bit for bit,
    # and the reference.
    x, w_in, w_up, w_out_t, active, mask = _ffn(3, 544, 301, fmt, gated, 0.7, masked=masked, seed=11)
    batch = ops.sparse_ffn(x, w_in, w_up, w_out_t, active, mask, activation, 0.1, fmt)
    for b in range(3):
        own_mask = mask[b : b + 1] if masked else None
        alone = ops.sparse_ffn(x[b : b + 1], w_in, w_up, w_out_t, active, own_mask, activation, 0.1, fmt)
        assert torch.equal(alone, batch[b : b + 1]), b
    _check_ffn((x[:1], w_in, w_up, w_out_t, active, mask[:1] if masked else None), activation, fmt)


@pytest.mark.parametrize("fmt", LAYOUTS)
@pytest.mark.parametrize("density", [0.0, 1.0])
def test_sparse_ffn_empty_and_full_active_sets(isa, fmt, density):
    args = _ffn(4, 64, 50, fmt, True, density, masked=True)
    assert args[4].numel() == (0 if density == 0.0 else 50)
    _check_ffn(args, "silu", fmt)


@pytest.mark.parametrize("fmt", LAYOUTS)
def test_sparse_ffn_full_set_equals_the_dense_ffn(isa, fmt):
    """All neurons through the sparse kernel = the dense FFN through quantized linear (the engine's dense
    path over the same transposed rows)."""
    x, w_in, w_up, w_out_t, active, _ = _ffn(2, 256, 96, fmt, True, 1.0, masked=False)
    got = ops.sparse_ffn(x, w_in, w_up, w_out_t, active, None, "silu", 0.0, fmt)
    h = torch.nn.functional.silu(ops.linear(x, w_in, None, fmt)) * ops.linear(x, w_up, None, fmt)
    down = ops.dequantize(w_out_t, fmt.removesuffix("_i8"))
    torch.testing.assert_close(got, h @ down, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("fmt", LAYOUTS)
def test_opcheck(fmt):
    w = _weights(12, 64)
    q = ops.quantize(w, fmt)
    x = torch.randn(3, 64)
    torch.library.opcheck(torch.ops.sparseinfer.quantize.default, (w, fmt))
    torch.library.opcheck(torch.ops.sparseinfer.dequantize.default, (q, fmt))
    torch.library.opcheck(torch.ops.sparseinfer.linear.default, (x, q, None, fmt))
    args = _ffn(3, 64, 20, fmt, True, 0.5, masked=True)
    torch.library.opcheck(torch.ops.sparseinfer.sparse_ffn.default, (*args, "relu", 0.0, fmt))


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: ops.quantize(torch.randn(4, 33), "q8_0"), "multiple of 32"),
        (lambda: ops.quantize(torch.randn(4, 32), "q5_0"), "weight_format must be none, q8_0, q4_0, q8_0_i8"),
        (lambda: ops.quantize(torch.randn(4, 32), "none"), "format must be q8_0, q4_0, q8_0_i8 or q4_0_i8"),
        (
            lambda: ops.dequantize(torch.zeros(4, 35, dtype=torch.uint8), "q8_0"),
            "dequantize: q must be uint8",
        ),
        (
            lambda: ops.linear(torch.randn(2, 64), torch.zeros(3, 35, dtype=torch.uint8), None, "q8_0"),
            "uint8 of shape",
        ),
        (lambda: ops.linear(torch.randn(2, 64), torch.zeros(3, 68), None, "q8_0"), "uint8 of shape"),
        (
            lambda: ops.linear(torch.randn(2, 48), torch.zeros(3, 54, dtype=torch.uint8), None, "q4_0"),
            "multiple of 32",
        ),
    ],
)
def test_rejects_bad_arguments(call, message):
    with pytest.raises(RuntimeError, match=message):
        call()
