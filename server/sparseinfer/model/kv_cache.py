"""A preallocated key/value cache with one slot per live sequence.

Each layer owns k and v buffers of shape (max_batch, kv_heads, max_seq, head_dim), allocated once, so decoding
never allocates cache memory. A sequence owns one slot (a row) from ``allocate()`` until ``free()``.
``lengths[slot]`` is how many positions of that row are filled; rows fill independently, which lets the server
decode sequences of different lengths in one batched step. The lengths are host bookkeeping whatever the cache
device (read every step, to size the attention window): plain Python ints, so that ``reserve`` and ``advance``
cost no torch op. A decode step's torch ops on tiny tensors each cost tens of microseconds on a CPU whose
caches the weight stream has just flushed; dropping the ~20 that this bookkeeping took made batch-1 decode
1.014x as fast in q4_0 predicted and 1.008x in q8_0 dense on the 2-core SPR (8 and 6 alternate rounds in
one process).

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
        self._lengths = [0] * max_batch
        self._free: list[int] = list(range(max_batch))
        self._in_use: set[int] = set()

    @property
    def lengths(self) -> torch.Tensor:
        """(max_batch,) int64 on the CPU: each slot's filled positions (a copy)."""
        return torch.tensor(self._lengths, dtype=torch.long)

    @property
    def num_free(self) -> int:
        return len(self._free)

    def allocate(self) -> int:
        """Claim a free slot (its length starts at 0)."""
        if not self._free:
            raise CacheFullError(f"KV cache full: all {self.max_batch} slots are in use; free() one first")
        slot = self._free.pop(0)
        self._in_use.add(slot)
        self._lengths[slot] = 0
        return slot

    def free(self, slot: int) -> None:
        """Return a slot; its contents are not cleared (they are masked out until overwritten)."""
        if slot not in self._in_use:
            raise ValueError(f"slot {slot} is not allocated")
        self._in_use.remove(slot)
        self._free.append(slot)
        self._free.sort()
        self._lengths[slot] = 0

    def reset(self) -> None:
        """Free every slot."""
        self._free = list(range(self.max_batch))
        self._in_use.clear()
        self._lengths = [0] * self.max_batch

    def reserve(self, slots: list[int], num_new: int) -> list[int]:
        """Check that each of ``slots`` can take ``num_new`` more positions; return their lengths.

        Called by the model before it writes, so an overflowing step fails before touching any buffer.
        """
        if any(not 0 <= s < self.max_batch for s in slots):
            raise ValueError(f"slots {slots} out of range for a cache of {self.max_batch} slots")
        if len(set(slots)) != len(slots):
            raise ValueError(f"slots {slots} repeat a slot within one step")
        starts = [self._lengths[s] for s in slots]
        for slot, start in zip(slots, starts, strict=True):
            if start + num_new > self.max_seq:
                raise CacheFullError(
                    f"KV cache slot {slot} holds {start} positions; adding {num_new} would exceed "
                    f"max_seq={self.max_seq}"
                )
        return starts

    def advance(self, slots: list[int], num_new: int | list[int]) -> None:
        """Record that ``num_new`` positions (one count for all, or one per slot) were written to each of
        ``slots``."""
        counts = num_new if isinstance(num_new, list) else [num_new] * len(slots)
        for slot, n in zip(slots, counts, strict=True):
            self._lengths[slot] += n

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)
