"""engine.hugepages: the copy is exact, aligned, freed with its tensor, skipped where it does not apply."""

from pathlib import Path

import pytest
import torch

from sparseinfer.engine import hugepages
from sparseinfer.engine.hugepages import HUGE_PAGE, to_hugepages

needs_thp = pytest.mark.skipif(not hugepages.enabled(), reason="no transparent huge pages here")


@needs_thp
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_copy_is_exact_contiguous_and_aligned(dtype):
    t = torch.randn(700, 1500).to(dtype)  # > 2 MiB in either dtype
    h = to_hugepages(t)
    assert h.data_ptr() != t.data_ptr() and h.data_ptr() % HUGE_PAGE == 0
    assert h.is_contiguous() and h.dtype == dtype and torch.equal(h, t)


@needs_thp
def test_copy_outlives_its_source_and_accepts_views():
    t = torch.randn(1500, 700)
    want = t.t().clone()
    h = to_hugepages(t.t())  # a non-contiguous view: copied into row-major order
    del t
    assert h.is_contiguous() and torch.equal(h, want)


def test_small_tensors_are_left_alone():
    t = torch.randn(10, 10)
    assert to_hugepages(t) is t


def test_switched_off_by_the_engine_setting():
    t = torch.randn(700, 1500)
    assert to_hugepages(t, wanted=False) is t
    from sparseinfer.cli import read_environment

    assert read_environment({"SPARSEINFER_HUGEPAGES": "0"}).engine_config().sparsity.hugepages is False
    assert read_environment({}).engine_config().sparsity.hugepages is True


@needs_thp
def test_cpu_tiers_and_predictors_live_in_huge_pages():
    from sparseinfer.engine.hybrid import make_tier
    from sparseinfer.engine.sparse_ffn import LayerPredictor

    m, d = 2048, 768  # 3 MiB per bf16 matrix
    w_in, w_up = torch.randn(m, d).bfloat16(), torch.randn(m, d).bfloat16()
    w_out = torch.randn(d, m).bfloat16()
    tier = make_tier(w_in, w_up, w_out, torch.arange(m), torch.device("cpu"), hot=False)
    for t in (tier.w_in, tier.w_up, tier.w_out_t):  # (the tier keeps only W_out^T of the down projection)
        assert t.data_ptr() % HUGE_PAGE == 0
    assert torch.equal(tier.w_in, w_in) and torch.equal(tier.w_out_t, w_out.t())
    big = 6000  # Q4_0 rows of 768 weights are 432 bytes: 2.5 MiB, past one huge page
    w_in, w_up, w_out = torch.randn(big, d), torch.randn(big, d), torch.randn(d, big)
    quantized = make_tier(w_in, w_up, w_out, torch.arange(big), torch.device("cpu"), False, weights="q4_0")
    for t in (quantized.w_in, quantized.w_up, quantized.w_out_t):
        assert t.dtype == torch.uint8 and t.data_ptr() % HUGE_PAGE == 0
    pred = LayerPredictor(
        torch.randn(1500, d), torch.zeros(1500), torch.randn(m, 1500), torch.zeros(m), 0.5, None
    )
    moved = pred.to(torch.device("cpu"), torch.bfloat16)
    assert moved.w1.data_ptr() % HUGE_PAGE == 0 and moved.w2.data_ptr() % HUGE_PAGE == 0


def _vm_flags(address: int) -> set[str]:
    """The VmFlags of the mapping of this process that holds ``address`` (/proc/self/smaps)."""
    inside = False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()[0]
        if "-" in head and ":" not in head:
            lo, hi = (int(v, 16) for v in head.split("-"))
            inside = lo <= address < hi
        elif inside and line.startswith("VmFlags:"):
            return set(line.split()[1:])
    raise AssertionError(f"no mapping holds {address:#x}")


@needs_thp
def test_the_last_partial_huge_page_stays_on_small_pages():
    # 5 MiB: two whole 2 MiB extents advised huge, the last 1 MiB not (a huge page there would make 2 MiB
    # resident for it).
    h = to_hugepages(torch.ones(5 << 18))
    start, end = h.data_ptr(), h.data_ptr() + h.numel() * h.element_size()
    assert "hg" in _vm_flags(start) and "hg" in _vm_flags(start + 2 * HUGE_PAGE - 1)
    assert "nh" in _vm_flags(start + 2 * HUGE_PAGE) and "nh" in _vm_flags(end - 1)
    assert torch.equal(h, torch.ones(5 << 18))
    whole = to_hugepages(torch.ones(HUGE_PAGE // 2))  # 4 MiB, two whole huge pages: nothing left out
    assert "nh" not in _vm_flags(whole.data_ptr() + HUGE_PAGE - 1)
