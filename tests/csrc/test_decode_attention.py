"""sparseinfer::decode_attention against reference.py (and the unfused torch rope it replaces), on every ISA
path: odd head sizes, grouped-query heads, rows at different positions in scattered slots, opcheck, and the
argument checks."""

import pytest
import torch

from sparseinfer import ops, reference
from sparseinfer.model.rope import apply_rope, rope_tables

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}


def _case(B, H, KVH, hd, slots, max_seq, positions, dtype, seed=0):
    """(qkv (B, 1, (H + 2 KVH) hd), cos, sin, k_cache, v_cache, slots, positions, H): a decode step's
    arguments, the caches full of stale random rows."""
    gen = torch.Generator().manual_seed(seed)
    qkv = torch.randn(B, 1, (H + 2 * KVH) * hd, generator=gen).to(dtype)
    inv_freq = 1.0 / (10000 ** (torch.arange(0, hd, 2).float() / hd))
    cos, sin = rope_tables(inv_freq, max_seq, dtype)
    k_cache = torch.randn(slots, KVH, max_seq, hd, generator=gen).to(dtype)
    v_cache = torch.randn(slots, KVH, max_seq, hd, generator=gen).to(dtype)
    slot = torch.randperm(slots, generator=gen)[:B]
    pos = torch.tensor(positions, dtype=torch.long)
    return qkv, cos, sin, k_cache, v_cache, slot, pos, H


def _split(qkv, H, KVH, hd):
    """q (B, H, hd), k and v (B, KVH, hd) out of the stacked rows."""
    return qkv.reshape(qkv.shape[0], H + 2 * KVH, hd).split((H, KVH, KVH), dim=1)


def _both(args, scale):
    qkv, cos, sin, k_cache, v_cache, slot, pos, H = args
    kc, vc = k_cache.clone(), v_cache.clone()
    got = ops.decode_attention(qkv, cos, sin, kc, vc, slot, pos, H, scale)
    kr, vr = k_cache.clone(), v_cache.clone()
    want = reference.decode_attention(qkv, cos, sin, kr, vr, slot, pos, H, scale)
    return got, want, (kc, vc), (kr, vr)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    ("B", "H", "KVH", "hd", "positions"),
    [
        (1, 1, 1, 2, [0]),
        (1, 32, 32, 128, [70]),
        (3, 8, 2, 64, [0, 17, 39]),  # GQA, 4 query heads per kv head: two passes of two
        (2, 6, 2, 34, [5, 31]),  # 3 per kv head: an odd last pass; head_dim off the vector width
        (4, 4, 4, 16, [39, 0, 1, 8]),
    ],
)
def test_matches_reference(isa, dtype, B, H, KVH, hd, positions) -> None:
    max_seq = 40 if max(positions) < 40 else 80
    args = _case(B, H, KVH, hd, slots=5, max_seq=max_seq, positions=positions, dtype=dtype)
    got, want, (kc, vc), (kr, vr) = _both(args, hd**-0.5)
    assert got.shape == (B, 1, H * hd) and got.dtype == dtype
    torch.testing.assert_close(got, want, rtol=TOL[dtype], atol=TOL[dtype])
    assert torch.equal(kc, kr) and torch.equal(vc, vr)  # the new rows, and nothing else, written


@pytest.mark.parametrize("dtype", DTYPES)
def test_cached_keys_are_the_unfused_rope_bit_for_bit(dtype) -> None:
    qkv, cos, sin, k_cache, v_cache, slot, pos, H = _case(3, 4, 4, 64, 4, 50, [3, 49, 0], dtype)
    ops.decode_attention(qkv, cos, sin, k_cache, v_cache, slot, pos, H, 0.125)
    _, k, v = _split(qkv, 4, 4, 64)
    at = (cos[pos][:, None, None], sin[pos][:, None, None])  # (B, 1, 1, hd)
    rotated = apply_rope(k[:, :, None], *at)[:, :, 0]  # (B, KVH, hd)
    assert torch.equal(k_cache[slot, :, pos], rotated)
    assert torch.equal(v_cache[slot, :, pos], v)


def test_rows_do_not_depend_on_batch_mates_or_threads(isa) -> None:
    qkv, cos, sin, k_cache, v_cache, slot, pos, H = _case(3, 8, 4, 64, 3, 64, [10, 63, 30], torch.bfloat16)
    together = ops.decode_attention(qkv, cos, sin, k_cache.clone(), v_cache.clone(), slot, pos, H, 0.125)
    before = torch.get_num_threads()
    try:
        for threads in (1, 3):
            torch.set_num_threads(threads)
            for b in range(3):
                alone = ops.decode_attention(
                    qkv[b : b + 1],
                    cos,
                    sin,
                    k_cache.clone(),
                    v_cache.clone(),
                    slot[b : b + 1],
                    pos[b : b + 1],
                    H,
                    0.125,
                )
                assert torch.equal(alone[0], together[b])
    finally:
        torch.set_num_threads(before)


def test_long_window_softmax_is_stable() -> None:
    # Large scores: the max is subtracted before the exponential, so nothing overflows to inf/NaN.
    qkv, cos, sin, k_cache, v_cache, slot, pos, H = _case(1, 2, 1, 32, 1, 600, [599], torch.float32)
    got, want, _, _ = _both((qkv * 40, cos, sin, k_cache * 40, v_cache, slot, pos, H), 1.0)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_empty_batch() -> None:
    qkv, cos, sin, k_cache, v_cache, _, _, H = _case(1, 2, 2, 8, 2, 4, [0], torch.float32)
    none = torch.zeros(0, dtype=torch.long)
    out = ops.decode_attention(qkv[:0], cos, sin, k_cache, v_cache, none, none, H, 1.0)
    assert out.shape == (0, 1, 16)


def test_opcheck() -> None:
    args = _case(2, 4, 2, 16, 3, 8, [2, 7], torch.float32)
    torch.library.opcheck(torch.ops.sparseinfer.decode_attention.default, (*args, 0.25))
    qkv, *rest = args
    torch.library.opcheck(torch.ops.sparseinfer.decode_attention.default, (qkv[:, 0], *rest, 0.25))  # (B, N)


def _bad(name):
    qkv, cos, sin, k_cache, v_cache, slot, pos, H = _case(2, 4, 2, 16, 3, 8, [2, 7], torch.float32)
    if name == "duplicate slots":
        slot = torch.tensor([1, 1])
    elif name == "position past the cache":
        pos = torch.tensor([2, 8])
    elif name == "slot out of range":
        slot = torch.tensor([0, 3])
    elif name == "dtype":
        k_cache = k_cache.bfloat16()
    elif name == "heads":
        H = 3
    elif name == "width":
        qkv = qkv[..., :-16]
    elif name == "int32 positions":
        pos = pos.int()
    return qkv, cos, sin, k_cache, v_cache, slot, pos, H


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("duplicate slots", "are both 1"),
        ("position past the cache", r"positions\[1\] = 8 is out of range"),
        ("slot out of range", r"slots\[1\] = 3 is out of range"),
        ("dtype", "must be in qkv's dtype"),
        ("heads", "3 query heads are not a multiple of 2 kv heads"),
        ("width", r"qkv must be \(B, \.\.\., \(H \+ 2 KVH\) head_dim\) = \(2, \.\.\., 128\)"),
        ("int32 positions", "must be int64"),
    ],
)
def test_rejects_bad_arguments(name, message) -> None:
    with pytest.raises(RuntimeError, match=message):
        ops.decode_attention(*_bad(name), 1.0)
