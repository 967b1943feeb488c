"""CPU weights in transparent huge pages (2 MiB instead of 4 KiB).

The sparse FFN reads one 8 KB row per active neuron from scattered places in a layer's weights. On 4 KiB
pages nearly every such row needs new TLB entries (a 7B layer's ~270 MB spans 66,000 pages; the TLB covers a
few MB), and the page walks hold back the reads. Copied into memory advised ``MADV_HUGEPAGE`` the same rows
sit on a few hundred 2 MiB pages: ``sparse_ffn`` runs ~22% faster (benchmarks/results/README.md, "Design
measurements"). ``sparseinfer bench kernels`` places the dense and the sparse weights alike this way.

Linux only (elsewhere, or with ``/sys/kernel/mm/transparent_hugepage/enabled`` at ``never``, tensors are
left as they are). ``SparsityConfig.hugepages`` False (the CLI's ``$SPARSEINFER_HUGEPAGES=0``) turns it off:
the copy costs resident memory where the weights were a memory-mapped checkpoint.
"""

from __future__ import annotations

import mmap
from pathlib import Path

import torch

HUGE_PAGE = 2 << 20
_THP_MODE = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def enabled() -> bool:
    """Whether this platform can back a copy with huge pages: it has MADV_HUGEPAGE and THP is not off."""
    if not hasattr(mmap, "MADV_HUGEPAGE"):
        return False
    try:
        return "[never]" not in _THP_MODE.read_text()
    except OSError:
        return False


def to_hugepages(t: torch.Tensor, wanted: bool = True) -> torch.Tensor:
    """A contiguous copy of CPU tensor ``t`` in huge-page-advised memory (2 MiB aligned), or ``t`` itself
    where that does not apply: not ``wanted`` (the engine's ``hugepages`` setting), not on the CPU, smaller
    than one huge page, or not ``enabled()`` here.

    The copy lives in an anonymous mapping that the returned tensor keeps alive; it is freed with the tensor.
    """
    nbytes = t.numel() * t.element_size()
    if not wanted or t.device.type != "cpu" or nbytes < HUGE_PAGE or not enabled():
        return t
    # Over-allocate by one huge page so the data can start on a 2 MiB boundary: the kernel backs only
    # aligned 2 MiB extents with huge pages.
    region = mmap.mmap(-1, nbytes + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    region.madvise(mmap.MADV_HUGEPAGE)
    raw = torch.frombuffer(region, dtype=torch.uint8)  # holds `region` alive
    start = -raw.data_ptr() % HUGE_PAGE
    # The last, partial 2 MiB extent stays on 4 KiB pages: a huge page there would make the whole 2 MiB
    # resident for the few bytes the tensor ends with (~1 MiB a tensor, a few hundred tensors in a 7B model).
    tail = start + nbytes // HUGE_PAGE * HUGE_PAGE
    if tail < start + nbytes:
        region.madvise(mmap.MADV_NOHUGEPAGE, tail, len(region) - tail)
    out = raw[start : start + nbytes].view(t.dtype).view(t.shape)
    out.copy_(t)
    return out
