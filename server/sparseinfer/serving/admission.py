"""Which waiting requests start now: a pure function of plain numbers (TGI's ``next_batch``), so the
admission rules are testable without an engine, a model or a thread.

FIFO: requests start in arrival order while a batch row and a KV-cache slot are free, the token budget
(``Limits.max_total_tokens``, Σ prompt + max_new_tokens of the running requests) holds, and the batched
prefill, padded to its longest prompt, stays within ``Limits.max_prefill_tokens``. The first waiting request
is taken whatever its length when nothing else is in its way, so a long prompt is never starved; a request
that does not fit the budget waits for running ones to finish rather than let smaller ones jump ahead.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from sparseinfer.serving.config import Limits


@dataclass(frozen=True)
class Candidate:
    """A waiting request as admission sees it."""

    prompt_tokens: int
    reserved: int  # prompt tokens + max_new_tokens: what it holds of the token budget while it runs


def admissible(
    waiting: Sequence[Candidate], running: int, running_reserved: int, free_slots: int, limits: Limits
) -> int:
    """How many requests from the front of ``waiting`` start now (see the module docstring); ``running``
    requests hold ``running_reserved`` of the budget, and the cache has ``free_slots`` slots."""
    slots = min(limits.max_batch_size - running, free_slots)
    budget = limits.max_total_tokens
    taken, reserved, longest = 0, running_reserved, 0
    for c in waiting:
        if taken >= slots:
            break
        if budget is not None and (running or taken) and reserved + c.reserved > budget:
            break
        padded = max(longest, c.prompt_tokens)
        if taken and padded * (taken + 1) > limits.max_prefill_tokens:
            break
        taken += 1
        reserved += c.reserved
        longest = padded
    return taken
