"""A preallocated key/value cache with one slot per live sequence.

Each layer owns k and v buffers of shape (max_batch, kv_heads, max_seq, head_dim), allocated once, so decoding
never allocates cache memory. A sequence owns one slot (a row) from ``allocate()`` until ``free()``.
``lengths[slot]`` is how many positions of that row are filled; rows fill independently, which lets the server
decode sequences of different lengths in one batched step. ``lengths`` lives on the CPU whatever the cache
device: it is bookkeeping the host reads every step (to size the attention window), and keeping it there
avoids a device sync per step.

The buffers start zeroed rather than uninitialised: attention masks stale positions out, but a masked NaN left
in uninitialised memory would still poison the probabilities-times-values product.
"""

from __future__ import annotations

import torch

from sparseinfer.model.config import ModelConfig


class CacheFullError(RuntimeError):
    """No free slot, or a sequence would grow past ``max_seq``."""


class KVCache:
    def __init__(
        self,
        config: ModelConfig,
        max_batch: int,
        max_seq: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        if max_batch < 1 or max_seq < 1:
            raise ValueError(f"max_batch and max_seq must be positive, got {max_batch} and {max_seq}")
        self.max_batch = max_batch
        self.max_seq = max_seq
        self.dtype = dtype
        self.device = torch.device(device)
        shape = (max_batch, config.num_kv_heads, max_seq, config.head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_layers)]
        self.lengths = torch.zeros(max_batch, dtype=torch.long)  # (max_batch,), on the CPU
        self._free: list[int] = list(range(max_batch))
        self._in_use: set[int] = set()

    @property
    def num_free(self) -> int:
        return len(self._free)

    def allocate(self) -> int:
        """Claim a free slot (its length starts at 0)."""
        if not self._free:
            raise CacheFullError(f"KV cache full: all {self.max_batch} slots are in use; free() one first")
        slot = self._free.pop(0)
        self._in_use.add(slot)
        self.lengths[slot] = 0
        return slot

    def free(self, slot: int) -> None:
        """Return a slot; its contents are not cleared (they are masked out until overwritten)."""
        if slot not in self._in_use:
            raise ValueError(f"slot {slot} is not allocated")
        self._in_use.remove(slot)
        self._free.append(slot)
        self._free.sort()
        self.lengths[slot] = 0

    def reset(self) -> None:
        """Free every slot."""
        self._free = list(range(self.max_batch))
        self._in_use.clear()
        self.lengths.zero_()

    def reserve(self, slots: torch.Tensor, num_new: int) -> torch.Tensor:
        """Check that each of ``slots`` can take ``num_new`` more positions; return their lengths (B,).

        Called by the model before it writes, so an overflowing step fails before touching any buffer.
        """
        slots_cpu = slots.to("cpu", torch.long)
        if slots_cpu.numel() and (int(slots_cpu.min()) < 0 or int(slots_cpu.max()) >= self.max_batch):
            raise ValueError(f"slots {slots_cpu.tolist()} out of range for a cache of {self.max_batch} slots")
        if slots_cpu.unique().numel() != slots_cpu.numel():
            raise ValueError(f"slots {slots_cpu.tolist()} repeat a slot within one step")
        starts = self.lengths[slots_cpu]  # (B,)
        if slots_cpu.numel() and int(starts.max()) + num_new > self.max_seq:
            worst = int(slots_cpu[starts.argmax()])
            raise CacheFullError(
                f"KV cache slot {worst} holds {int(starts.max())} positions; adding {num_new} would exceed "
                f"max_seq={self.max_seq}"
            )
        return starts

    def advance(self, slots: torch.Tensor, num_new: int | torch.Tensor) -> None:
        """Record that ``num_new`` positions (one count for all, or (B,) per slot) were written to
        each of ``slots``."""
        self.lengths[slots.to("cpu", torch.long)] += num_new

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)
