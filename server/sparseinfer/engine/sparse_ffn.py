"""The sparse FFN executor: the module that replaces a decoder layer's ``mlp`` when sparse execution is on.

Per step it chooses every row's active set by that row's sparsity mode, runs the layer over the union of the
rows' sets (hybrid hot/cold, see ``hybrid.py``) with a per-row mask, and records per-request counts:

- ``dense``: every neuron (the dense GEMMs, no mask);
- ``oracle``: the truly active neurons, |h_i|·‖W_out[:, i]‖₂ ≥ ε_l (PAPER.md; ``sparsity.neurons``) from the
  calibrated thresholds: exactly the study's ``oracle_truncation`` model, the quality reference. It needs the
  dense h to find them, so it is no faster than dense;
- ``predicted``: the low-rank predictor's logits → ``ops.select_active`` with the layer's calibrated score
  threshold → ``ops.sparse_ffn`` over the union with the row mask (the fast path).

Rows of different modes share one batch: the row mask gives each row exactly its own set (dense rows: all
neurons), so a row's output never depends on its batch-mates (up to fp32 summation order).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from sparseinfer import ops
from sparseinfer.engine.hugepages import to_hugepages
from sparseinfer.engine.hybrid import DEFAULT_CROSSOVER, TieredFFN
from sparseinfer.model.linear import EVERY_INPUT
from sparseinfer.model.quant import dot_layout, quantizable, quantize_for_dots
from sparseinfer.model.step import ForwardStep, SparsityMode
from sparseinfer.sparsity.predictor import LowRankPredictor, strict_logit_threshold


class LayerPredictor:
    """A layer's low-rank predictor in the model dtype: logits = W2 φ(W1 x + b1) + b2, active iff logit >
    ``threshold``, the trained rule score ≥ t moved to the logit scale exactly (``strict_logit_threshold``).
    Built from the trained predictor by ``from_trained``."""

    def __init__(
        self,
        w1: torch.Tensor,
        b1: torch.Tensor,
        w2: torch.Tensor,
        b2: torch.Tensor,
        score_threshold: float,
        hidden_activation: str | None,
        formats: tuple[str, str] = ("none", "none"),
    ) -> None:
        self.w1, self.b1, self.w2, self.b2 = w1, b1, w2, b2  # (r, d), (r,), (m, r), (m,)
        self.hidden_activation = hidden_activation
        self.score_threshold = float(score_threshold)
        self.threshold = strict_logit_threshold(self.score_threshold)
        self.formats = formats  # ops.linear's weight_format of w1 and w2 ("none": in the biases' dtype)
        # Unquantized: inputs of at most this many rows through ops.linear, per weight (``model.linear``:
        # set by ``use_row_kernels`` through ``dense_projections``); until then our kernels for every input.
        self.rows_up_to = {"w1": EVERY_INPUT, "w2": EVERY_INPUT}

    @classmethod
    def from_trained(cls, predictor: LowRankPredictor, score_threshold: float) -> LayerPredictor:
        """The runtime form of a trained ``sparsity.predictor.LowRankPredictor`` and its score threshold."""
        p = predictor
        weights = (p.w1.weight, p.w1.bias, p.w2.weight, p.w2.bias)
        return cls(*(w.detach() for w in weights), score_threshold, p.hidden_activation)

    def _project(self, x: torch.Tensor, name: str, b: torch.Tensor, fmt: str) -> torch.Tensor:
        # Our kernels, except where the calibration found torch faster for inputs this long.
        w = getattr(self, name)
        if fmt == "none" and x.device.type == "cpu" and x.shape[0] > self.rows_up_to[name]:
            return F.linear(x, w, b)
        return ops.linear(x, w, b, fmt)

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        """(N, d) -> (N, m) logits in the model dtype."""
        z = self._project(x.to(self.b1.dtype).contiguous(), "w1", self.b1, self.formats[0])  # (N, r)
        if self.hidden_activation == "relu":
            z = F.relu(z)
        return self._project(z, "w2", self.b2, self.formats[1])  # (N, m)

    def dense_projections(self) -> Iterator[tuple[torch.Tensor, Callable[[int], None]]]:
        """The unquantized weights whose kernel ``model.linear.use_row_kernels`` decides, with a setter."""
        for name, fmt in zip(("w1", "w2"), self.formats, strict=True):
            if fmt == "none":
                yield getattr(self, name), lambda up_to, n=name: self.rows_up_to.__setitem__(n, up_to)

    @property
    def numel(self) -> int:
        """Weights and biases: the parameter count, whatever their storage."""
        r, m = self.b1.numel(), self.b2.numel()
        d = self.w1.shape[1]
        if self.formats[0] != "none":  # uint8 rows of 32-weight blocks
            d = d // ops.BLOCK_BYTES[self.formats[0]] * ops.BLOCK
        return r * d + r + m * r + m

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.w1, self.b1, self.w2, self.b2))

    def to(
        self,
        device: torch.device,
        dtype: torch.dtype,
        hugepages: bool = True,
        weights: str = "checkpoint",
    ) -> LayerPredictor:
        """A copy on ``device`` in ``dtype`` (the model's: a bf16 model reads half the predictor bytes), its
        weights quantized to ``weights`` (a ``model.quant`` format; CPU only, where rows hold whole blocks),
        in huge pages on the CPU unless ``hugepages`` is off."""
        b1, b2 = (to_hugepages(t.to(device, dtype).contiguous(), hugepages) for t in (self.b1, self.b2))
        packed, formats = [], []
        for w in (self.w1, self.w2):
            if weights != "checkpoint" and device.type == "cpu" and quantizable(w):
                packed.append(quantize_for_dots(w.float(), weights, hugepages))
                formats.append(dot_layout(weights))
            else:
                packed.append(to_hugepages(w.to(device, dtype).contiguous(), hugepages))
                formats.append("none")
        w1, w2 = packed
        return LayerPredictor(
            w1, b1, w2, b2, self.score_threshold, self.hidden_activation, (formats[0], formats[1])
        )


class SparseFFN(nn.Module):
    """Drop-in replacement for ``Block.mlp``: (B, T, d) -> (B, T, d), each row in the mode its
    ``ForwardStep`` gives it (``default_mode`` for every row when called without one)."""

    def __init__(
        self,
        layer: int,
        tiered: TieredFFN,
        eps: float | None,
        predictor: LayerPredictor | None,
        default_mode: SparsityMode = SparsityMode.DENSE,
        crossover: float = DEFAULT_CROSSOVER,
    ) -> None:
        super().__init__()
        self.layer = layer
        self.tiered = tiered
        self.eps = eps  # ε_l from the calibration (None: no oracle mode)
        self.predictor = predictor
        self.default_mode = SparsityMode(default_mode)
        self.crossover = crossover  # union density above which the layer runs its dense GEMMs
        self.m = tiered.m
        self._hot_count = int(tiered.hot_mask.sum())

    def dense_projections(self) -> Iterator[tuple[torch.Tensor, Callable[[int], None]]]:
        """The tiers' and the predictor's weights whose kernel ``model.linear.use_row_kernels`` decides."""
        yield from self.tiered.dense_projections()
        if self.predictor is not None:
            yield from self.predictor.dense_projections()

    def _truth(self, x: torch.Tensor) -> torch.Tensor:
        if self.eps is None:
            raise RuntimeError("no calibrated threshold for this layer (oracle mode is not available)")
        return self.tiered.true_mask(x, self.eps)  # (N, m)

    def _predict(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.predictor is None:
            raise RuntimeError("no predictor for this layer (predicted mode is not available)")
        scores = self.predictor.scores(x)  # (N, m)
        if scores.dtype not in (torch.float32, torch.bfloat16):
            scores = scores.float()
        return ops.select_active(scores, self.predictor.threshold, 0)  # (N, m) bool, (n,) int32

    def forward(self, x: torch.Tensor, step: ForwardStep | None = None) -> torch.Tensor:
        B, T, d = x.shape
        xf = x.reshape(B * T, d)  # (N, d)
        modes = step.modes if step is not None else (self.default_mode,) * B
        if len(modes) != B:
            raise RuntimeError(f"the step has {len(modes)} modes for a batch of {B} rows")
        measure = step is not None and step.measure_truth
        padded = step is not None and step.padded(T)
        kinds = set(modes)
        if kinds == {SparsityMode.DENSE} and not measure:
            out = self.tiered.dense(xf, None)  # (N, d): padding rows too (cheaper than removing them)
            if step is not None:
                step.record_dense(self.layer, self.m, self._hot_count, T)
            return out.view(B, T, d)

        truth = self._truth(xf) if (SparsityMode.ORACLE in kinds or measure) else None  # (N, m)
        if kinds == {SparsityMode.PREDICTED}:
            row_mask, union = self._predict(xf)
        elif kinds == {SparsityMode.ORACLE}:
            assert truth is not None
            row_mask = truth
            union = truth.any(0).nonzero().flatten().to(torch.int32)  # (n,)
        else:
            row_mode = torch.tensor(  # (N,) 0 dense, 1 oracle, 2 predicted
                [_MODE_INDEX[mo] for mo in modes for _ in range(T)], device=x.device
            )
            row_mask = (row_mode == 0)[:, None].expand(B * T, self.m)  # (N, m)
            if truth is not None and SparsityMode.ORACLE in kinds:
                row_mask = torch.where((row_mode == 1)[:, None], truth, row_mask)
            if SparsityMode.PREDICTED in kinds:
                row_mask = torch.where((row_mode == 2)[:, None], self._predict(xf)[0], row_mask)
            row_mask = row_mask.contiguous()  # an all-dense batch leaves the expanded view
            union = row_mask.any(0).nonzero().flatten().to(torch.int32)  # (n,)
        if padded:  # padding selects nothing: it must not widen the union or the counts
            assert step is not None and step.lengths is not None
            real = _real_tokens(step.lengths, T, x.device)  # (N,)
            row_mask = row_mask & real[:, None]
            union = row_mask.any(0).nonzero().flatten().to(torch.int32)  # (n,)
            if truth is not None:
                truth = truth & real[:, None]
        # One row: its mask is the union itself, so the kernel needs none.
        out = self.tiered.forward(xf, union, row_mask if B * T > 1 else None, self.crossover)  # (N, d)
        if step is not None:
            if B * T == 1 and truth is None:
                self._record_one(step, union)
            else:
                self._record(step, modes, B, T, row_mask, truth)
        return out.view(B, T, d)

    # ---- accounting ----
    def _record_one(self, step: ForwardStep, union: torch.Tensor) -> None:
        # One token (a batch-1 decode step): its set is the union, so the counts need no (1, m) reductions.
        n = int(union.numel())
        if self._hot_count in (0, self.m):  # one tier: no lookup needed
            hot: int | torch.Tensor = n if self._hot_count else 0
        else:
            hot = self.tiered.hot_mask[union.long()].sum()
        step.record(self.layer, [[n, hot, n, 0, 0]], (False,))

    def _record(
        self,
        step: ForwardStep,
        modes: tuple[SparsityMode, ...],
        B: int,
        T: int,
        row_mask: torch.Tensor,
        truth: torch.Tensor | None,
    ) -> None:
        rm = row_mask.reshape(B, T, self.m)  # (B, T, m)
        selected = rm.sum((1, 2))  # (B,)
        hot = (rm & self.tiered.hot_mask).sum((1, 2))  # (B,)
        union = rm.any(1).sum(-1)  # (B,)
        measured = tuple(
            truth is not None and (mo == SparsityMode.ORACLE or step.measure_truth) for mo in modes
        )  # per row: only where the row's own mode (or the caller) asked for it
        if truth is not None:
            tm = truth.reshape(B, T, self.m)
            truly = tm.sum((1, 2))  # (B,)
            computed = (tm & rm).sum((1, 2))  # (B,)
        else:
            truly = computed = torch.zeros_like(selected)
        step.record(self.layer, torch.stack([selected, hot, union, truly, computed], dim=1), measured)


_MODE_INDEX = {SparsityMode.DENSE: 0, SparsityMode.ORACLE: 1, SparsityMode.PREDICTED: 2}


def _real_tokens(lengths: tuple[int, ...], T: int, device: torch.device) -> torch.Tensor:
    """(B*T,) bool: True at each row's first ``lengths[b]`` tokens (right padding is False)."""
    n = torch.tensor(lengths, device=device)  # (B,)
    return (torch.arange(T, device=device)[None, :] < n[:, None]).flatten()
