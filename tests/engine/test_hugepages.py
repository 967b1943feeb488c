"""engine.hugepages: the copy is exact, aligned, freed with its tensor, skipped where it does not apply."""

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


def test_switched_off_by_environment(monkeypatch):
    monkeypatch.setenv("SPARSEINFER_HUGEPAGES", "0")
    t = torch.randn(700, 1500)
    assert not hugepages.enabled() and to_hugepages(t) is t
