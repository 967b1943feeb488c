"""One forward step, passed to the model as an argument: what the engine asks of every FFN layer, and the
per-row counts the layers write back.

The engine builds a ``ForwardStep`` for each forward (``Engine._forward``) and hands it to
``Transformer.forward(..., step=)``, which passes it to every block's FFN. Nothing about a step lives in
shared state: a forward that raises leaves nothing behind, and two models never see each other's steps.

- ``modes``: each batch row's sparsity mode (``SparsityMode``); the dense ``FFN`` computes every row in
  full whatever the mode, the engine's ``SparseFFN`` computes each row's own active set.
- ``lengths``: each row's real tokens when the rows are right-padded to a common T (a batched prefill of
  prompts of different lengths); None: every token is real. The model takes logits at each row's last real
  token and attends per length; the FFNs compute no sparse neuron for padding and never count it.
- ``counts``: one entry per layer, (B, 5) per row (``COUNT_FIELDS``), written by dense and sparse layers
  alike; ``commit`` adds them to the rows' ``SparsityTally`` once the forward has completed.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from sparseinfer.engine.accounting import SparsityTally


class SparsityMode(str, enum.Enum):
    """Which neurons of each FFN a request computes (the string values are the CLI's and the logs')."""

    DENSE = "dense"  # every neuron
    ORACLE = "oracle"  # the truly active ones (|h_i|·‖W_out[:, i]‖ ≥ ε_l): the quality reference
    PREDICTED = "predicted"  # the ones the low-rank predictor selects: the fast path

    def __str__(self) -> str:
        return self.value


MODES: tuple[str, ...] = tuple(m.value for m in SparsityMode)

# Per batch row, per layer: neurons computed, of those hot, the row's union over its tokens, truly active,
# truly active and computed (the last two are 0 where not measured; ``measured`` says where they are).
COUNT_FIELDS = ("selected", "hot", "union", "truly_active", "truly_computed")
# A (B, 5) int64 tensor, or (cheaper when the numbers are known on the host) B lists of 5 ints / 0-d tensors.
Counts = torch.Tensor | list[list[int | torch.Tensor]]


@dataclass
class ForwardStep:
    """See the module docstring."""

    modes: tuple[SparsityMode, ...]  # per batch row (B,)
    lengths: tuple[int, ...] | None = None  # per row, its real tokens when right-padded; None: all real
    measure_truth: bool = False  # also measure the true active set of predicted and dense rows
    counts: list[Counts | None] = field(default_factory=list)  # per layer: (B, 5), see COUNT_FIELDS
    measured: list[tuple[bool, ...] | None] = field(default_factory=list)  # per layer: per row

    @classmethod
    def of(
        cls, modes: Sequence[str], lengths: Sequence[int] | None = None, measure_truth: bool = False
    ) -> ForwardStep:
        rows = tuple(lengths) if lengths is not None else None
        return cls(tuple(SparsityMode(m) for m in modes), rows, measure_truth)

    def padded(self, T: int) -> bool:
        """Whether some row of a (B, T) forward is right padding past its real length."""
        return self.lengths is not None and min(self.lengths) < T

    def row_tokens(self, T: int) -> tuple[int, ...]:
        """Each row's real tokens in a (B, T) forward."""
        return self.lengths if self.lengths is not None else (T,) * len(self.modes)

    def record(self, layer: int, counts: Counts, measured: tuple[bool, ...]) -> None:
        while len(self.counts) <= layer:
            self.counts.append(None)
            self.measured.append(None)
        self.counts[layer] = counts
        self.measured[layer] = measured

    def record_dense(self, layer: int, m: int, hot: int, T: int) -> None:
        """Layer ``layer`` computed all its ``m`` neurons (``hot`` of them on the hot tier) for every real
        token of every row."""
        rows: Counts = [[n * m, n * hot, m, 0, 0] for n in self.row_tokens(T)]
        self.record(layer, rows, (False,) * len(self.modes))

    def commit(self, tallies: Sequence[SparsityTally], T: int) -> None:
        """Add this step's counts to ``tallies[b]`` (row b) after the forward completed."""
        num_layers = len(tallies[0].layer_neurons) if tallies else 0
        if len(self.counts) != num_layers or any(c is None for c in self.counts):
            raise RuntimeError("a step did not record every FFN layer")
        table = [_rows(c) for c in self.counts]  # (L, B, 5) ints
        for b, (tally, n) in enumerate(zip(tallies, self.row_tokens(T), strict=True)):
            tally.record_step(n)
            for li in range(num_layers):
                sel, hot, union, truly, computed = table[li][b]
                measured = self.measured[li][b]  # type: ignore[index]
                tally.record_layer(
                    li, n, sel, hot, union, truly if measured else None, computed if measured else None
                )


def _rows(counts: Counts | None) -> list[list[int]]:
    assert counts is not None
    if isinstance(counts, torch.Tensor):
        return counts.tolist()
    return [[int(v) for v in row] for row in counts]
