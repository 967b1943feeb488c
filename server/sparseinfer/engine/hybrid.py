"""One FFN layer's weights split into tiers (hot on the fast device, cold on the CPU), and the hybrid step.

A ``Tier`` holds a contiguous shard of the layer's neurons: rows of W_in / W_up and rows of W_out^T (one row
per neuron, the layout the sparse kernels read), plus ``ids``, the global neuron ids of its rows (ascending).
``TieredFFN`` keeps the global → (tier, local row) maps and runs the hybrid step:

    union (global ids) → hot local ids + cold local ids → launch the hot part (CUDA kernels are asynchronous,
    so this returns at once) → compute the cold part on the CPU meanwhile → sum on the output device.

Above ``crossover`` (union size / m) the dense GEMMs beat the gather kernels, so the step runs each tier
densely instead (with the same masks, so the result is the same function). Without a GPU both tiers are on
the CPU: the same code runs, which is how the split is tested on CPU-only machines.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from sparseinfer import ops
from sparseinfer.engine.hugepages import to_hugepages
from sparseinfer.model.ffn import activation_fn, hidden
from sparseinfer.model.linear import EVERY_INPUT, linear
from sparseinfer.model.quant import dot_layout, quantizable, quantize_for_dots
from sparseinfer.sparsity.neurons import active_mask

# Union density above which a layer runs its dense path instead of the sparse kernels
# (``SparsityConfig.crossover`` overrides it). 1.0, never: a CPU tier's dense path IS the sparse kernel over
# every row, so falling back can only read more rows. (The fp32 fallback at 50% that stood here compared the
# kernel with torch's dense GEMMs, a dense path CPU tiers no longer take; see benchmarks/results/README.md for
# what the old crossover tables measured.) A GPU tier's dense path is cuBLAS; its crossover is unmeasured.
DEFAULT_CROSSOVER = 1.0


@dataclass(frozen=True)
class CrossoverCosts:
    """What a batched CPU FFN step costs on each path (``TieredFFN._gemms_win`` compares them), in seconds or
    any one unit: the sparse kernel ``per_neuron`` of the union (its rows read once for all input rows) plus
    ``per_pair`` (row, neuron) it computes; torch's GEMMs ``gemm_per_neuron[i]`` per neuron of the layer for
    ``gemm_rows[i]`` input rows, linear between rungs, the first rung's below them and proportional to the
    rows beyond the last (compute-bound there). Measured per machine at load (``engine.ffn_calibration``)."""

    per_neuron: float
    per_pair: float
    gemm_rows: tuple[int, ...]
    gemm_per_neuron: tuple[float, ...]

    def gemms(self, n: int) -> float:
        """torch's GEMMs' cost per neuron of the layer for ``n`` input rows."""
        rows, cost = self.gemm_rows, self.gemm_per_neuron
        if n <= rows[0]:
            return cost[0]
        if n >= rows[-1]:
            return cost[-1] * n / rows[-1]
        i = next(i for i in range(1, len(rows)) if n <= rows[i])
        f = (n - rows[i - 1]) / (rows[i] - rows[i - 1])
        return cost[i - 1] + f * (cost[i] - cost[i - 1])

    def gemms_win(self, n: int, m: int, union: int, pairs: int) -> bool:
        """Whether the GEMMs over all ``m`` neurons cost less than the sparse kernel over ``union`` neurons
        and ``pairs`` (row, neuron) pairs, for ``n`` rows."""
        return self.per_neuron * union + self.per_pair * pairs > self.gemms(n) * m


# Until a calibration says otherwise: a fit to ``scripts/ffn_crossover.py`` on 2 Sapphire Rapids cores (AMX;
# LLaMA-7B shapes in bf16; benchmarks/results/README.md, "Batched FFN: sparse kernel or GEMMs"): ~0.73 µs
# per union neuron, ~0.24 µs per pair, GEMMs ~1.56 µs per neuron from 8 to 32 rows; as integers 15 : 5 : 32,
# so that the boundary has no rounding. On a 2-core Zen 4 (AVX512_BF16, no AMX) the sparse kernel costs the
# same but the GEMMs 2.5 µs per neuron at 16 rows and 8.4 at 128: hence the calibration.
DEFAULT_COSTS = CrossoverCosts(15.0, 5.0, (8, 32), (32.0, 32.0))


@dataclass
class Tier:
    device: torch.device
    ids: torch.Tensor  # (m_t,) int64 global neuron ids, ascending, on the CPU
    w_in: torch.Tensor  # (m_t, d), in the tier's dtype or as uint8 rows of ``weights`` blocks (dot layout)
    w_up: torch.Tensor | None  # (m_t, d) or None (non-gated), as w_in
    # (m_t, d): one row per neuron, the layout the sparse kernels read; quantized: plain ``weights`` blocks.
    # The only copy of the down projection: a CPU tier's dense path runs the sparse kernel over every row.
    w_out_t: torch.Tensor
    norms: torch.Tensor  # (m_t,) float32 ‖W_out[:, i]‖₂ of the unquantized weights, for the active test
    hot: bool  # served by the fast tier (accounting's hot_share)
    weights: str = "checkpoint"  # "checkpoint" (the tier's dtype) or a ``model.quant`` format
    all_rows: torch.Tensor = field(init=False)  # (m_t,) int32 0..m_t-1 on the device: the dense path's set

    def __post_init__(self) -> None:
        self.all_rows = torch.arange(self.size, dtype=torch.int32, device=self.device)

    @property
    def size(self) -> int:
        return int(self.ids.numel())

    @property
    def quantized(self) -> bool:
        return self.weights != "checkpoint"

    @property
    def dot_format(self) -> str:
        """The weight_format of w_in / w_up for ``ops`` ("none" in the tier's dtype)."""
        return dot_layout(self.weights) if self.quantized else "none"

    @property
    def nbytes(self) -> int:
        ws = [self.w_in, self.w_out_t] + ([self.w_up] if self.w_up is not None else [])
        return sum(w.numel() * w.element_size() for w in ws)


def make_tier(
    w_in: torch.Tensor,
    w_up: torch.Tensor | None,
    w_out: torch.Tensor,
    ids: torch.Tensor,
    device: torch.device,
    hot: bool,
    hugepages: bool = True,
    weights: str = "checkpoint",
) -> Tier:
    """Copy rows ``ids`` of a layer's weights into a contiguous shard on ``device``, quantized to
    ``weights`` (a ``model.quant`` format, CPU tiers only) or in their dtype.

    w_in / w_up: (m, d) gate_proj / up_proj weights; w_out: (d, m) down_proj weight. A CPU shard lives in
    huge pages (``hugepages``: the sparse kernel's scattered row reads need them to approach memory
    bandwidth). Where that is off, a shard of every neuron, in order, on the weights' own device reuses
    w_in / w_up as they are (no copy: a memory-mapped checkpoint stays mapped); W_out^T is always a new
    tensor.
    """
    ids = ids.to("cpu", torch.long)
    m = w_in.shape[0]
    whole = ids.numel() == m and bool(torch.equal(ids, torch.arange(m))) and w_in.device == device
    quantized = weights != "checkpoint"
    if quantized and (device.type != "cpu" or not quantizable(w_in)):
        raise ValueError(f"--weights {weights}: the quantized kernels need CPU rows of whole 32-blocks")

    def shard(w: torch.Tensor) -> torch.Tensor:
        if whole and w.is_contiguous() and not quantized:
            return to_hugepages(w, hugepages)
        rows = w.index_select(0, ids.to(w.device)).to(device).contiguous()  # (m_t, d)
        return quantize_for_dots(rows, weights, hugepages) if quantized else to_hugepages(rows, hugepages)

    down = w_out.t().index_select(0, ids.to(w_out.device)).to(device).contiguous()  # (m_t, d)
    norms = torch.linalg.vector_norm(down.float(), dim=1)  # (m_t,)
    w_out_t = to_hugepages(ops.quantize(down, weights) if quantized else down, hugepages)
    w_up_t = shard(w_up) if w_up is not None else None
    return Tier(device, ids, shard(w_in), w_up_t, w_out_t, norms, hot, weights)


class TieredFFN:
    """A layer's neurons in one or two tiers, and the hybrid sparse / dense computation over them."""

    def __init__(
        self,
        tiers: list[Tier],
        num_neurons: int,
        out_device: torch.device,
        activation: str,
        threshold: float,
    ) -> None:
        self.tiers = [t for t in tiers if t.size > 0]
        # model.linear's for the tiers' gate/up GEMMs: set by ``use_row_kernels`` (``dense_projections``)
        # from the CPU tier's calibration; until then our kernels for every input.
        self.rows_up_to = EVERY_INPUT
        self.costs = DEFAULT_COSTS  # both batched paths' costs here (``engine.ffn_calibration``)
        self._quantized = any(t.quantized for t in self.tiers)
        self.m = num_neurons
        self.out_device = out_device
        self.activation = activation
        self.threshold = threshold
        self.act = activation_fn(activation, threshold)
        tier_of = torch.full((num_neurons,), -1, dtype=torch.long)
        local = torch.zeros(num_neurons, dtype=torch.int32)
        for ti, t in enumerate(self.tiers):
            tier_of[t.ids] = ti
            local[t.ids] = torch.arange(t.size, dtype=torch.int32)
        if bool((tier_of < 0).any()):
            raise ValueError("tiers do not cover every neuron of the layer")
        self.tier_of = tier_of.to(out_device)  # (m,)
        self.local = local.to(out_device)  # (m,) row of each neuron inside its tier
        # A single tier that holds every neuron in order on the output device needs no index translation.
        only = self.tiers[0] if len(self.tiers) == 1 else None
        self._identity = only is not None and only.device == out_device
        self._ids_dev = [t.ids.to(out_device) for t in self.tiers]
        hot = torch.zeros(num_neurons, dtype=torch.bool)
        for t in self.tiers:
            hot[t.ids] = t.hot
        self.hot_mask = hot.to(out_device)  # (m,) served by the hot tier

    def _project(self, x: torch.Tensor, w: torch.Tensor, tier: Tier) -> torch.Tensor:
        if tier.quantized:
            return ops.linear(x, w, None, tier.dot_format)
        return linear(x, w, rows_up_to=self.rows_up_to)

    def dense_projections(self) -> Iterator[tuple[torch.Tensor, Callable[[int], None]]]:
        """The weights whose kernel ``model.linear.use_row_kernels`` decides, with a setter: the CPU tier's
        unquantized gate/up rows (a hot tier's GEMMs run on its GPU, where ``linear`` takes torch)."""
        for t in self.tiers:
            if t.device.type == "cpu" and not t.quantized:
                yield t.w_in, lambda up_to: setattr(self, "rows_up_to", up_to)
                return

    def cpu_tier(self) -> Tier | None:
        """The unquantized CPU tier whose batched steps ``_gemms_win`` decides, if there is one."""
        return next((t for t in self.tiers if t.device.type == "cpu" and not t.quantized), None)

    def _gemms_win(self, n: int, union: int, row_mask: torch.Tensor | None) -> bool:
        """Whether torch's GEMMs beat the sparse kernel for ``n`` rows over ``union`` neurons (``row_mask``:
        which rows use which, None: all rows the whole union), on a CPU where ``model.linear`` hands inputs
        this long to torch: by the costs measured on this machine (``costs``, ``CrossoverCosts``)."""
        if n <= self.rows_up_to or self._quantized:
            return False
        pairs = n * union if row_mask is None else int(row_mask.sum())
        return self.costs.gemms_win(n, self.m, union, pairs)

    def activations(self, x: torch.Tensor, tier: Tier) -> torch.Tensor:
        """Dense h of one tier's neurons: x (N, d) on the tier's device -> (N, m_t), in x's dtype."""
        up = self._project(x, tier.w_up, tier) if tier.w_up is not None else None  # (N, m_t)
        return hidden(self.act, self.activation, self._project(x, tier.w_in, tier), up)  # (N, m_t)

    def true_mask(self, x: torch.Tensor, eps: float) -> torch.Tensor:
        """(N, m) bool on the output device: the truly active neurons (|h_i|·‖W_out[:, i]‖ ≥ ε)."""
        if self._identity:
            t = self.tiers[0]
            return active_mask(self.activations(x, t), t.norms, eps)
        mask = torch.empty(x.shape[0], self.m, dtype=torch.bool, device=self.out_device)
        for t, ids in zip(self.tiers, self._ids_dev, strict=True):
            h = self.activations(x.to(t.device), t)  # (N, m_t)
            mask[:, ids] = active_mask(h, t.norms, eps).to(self.out_device)
        return mask

    def dense(self, x: torch.Tensor, row_mask: torch.Tensor | None) -> torch.Tensor:
        """Every neuron computed; h zeroed where ``row_mask`` (N, m) is False. A tier keeps one down layout,
        W_out^T: on the CPU the sparse kernel runs over all its rows (bandwidth-bound like a GEMV, in every
        dtype and format) unless torch's GEMMs win (``_gemms_win``); those, and the GEMMs elsewhere, take the
        transposed view (cuBLAS and oneDNN read either layout)."""
        # Inputs go to every tier before any compute (see ``forward``: no copy may queue behind the hot work).
        inputs = []
        for t, ids in zip(self.tiers, self._ids_dev, strict=True):
            keep = None
            if row_mask is not None:
                keep = (row_mask if self._identity else row_mask[:, ids]).to(t.device)  # (N, m_t)
            inputs.append((t, x.to(t.device), keep))
        parts = []
        for t, xt, keep in inputs:
            if t.device.type == "cpu" and not self._gemms_win(xt.shape[0], self.m, keep):
                parts.append(self._sparse(t, xt, t.all_rows, keep))  # (N, d)
                continue
            parts.append(self._gemms(t, xt, keep))  # (N, d) on the tier's device
        return self._sum(parts)

    def _gemms(self, t: Tier, x: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
        """One tier's FFN through the dense projections (``model.linear``), h zeroed where ``keep`` (N, m_t)
        is False: x (N, d) -> (N, d)."""
        h = self.activations(x, t)  # (N, m_t)
        if keep is not None:
            h = h * keep.to(h.dtype)
        return linear(h, t.w_out_t.t())  # (N, d)

    def _sparse(
        self, t: Tier, x: torch.Tensor, rows: torch.Tensor, mask: torch.Tensor | None
    ) -> torch.Tensor:
        return ops.sparse_ffn(
            x, t.w_in, t.w_up, t.w_out_t, rows, mask, self.activation, self.threshold, t.dot_format
        )

    def _sum(self, parts: list[torch.Tensor]) -> torch.Tensor:
        out = parts[0].to(self.out_device)
        for p in parts[1:]:
            out = out + p.to(self.out_device)
        return out

    def forward(
        self, x: torch.Tensor, union: torch.Tensor, row_mask: torch.Tensor | None, crossover: float
    ) -> torch.Tensor:
        """FFN over the neurons in ``union`` (int32 ascending global ids), h masked per row by ``row_mask``
        (N, m) when given (None: every row uses the whole union). x (N, d) -> (N, d) on the output device."""
        if union.numel() > crossover * self.m or self._gemms_win(x.shape[0], union.numel(), row_mask):
            if row_mask is None and union.numel() < self.m:
                row_mask = torch.zeros(x.shape[0], self.m, dtype=torch.bool, device=self.out_device)
                row_mask[:, union.long()] = True
            return self.dense(x, row_mask)
        if self._identity:
            return self._sparse(self.tiers[0], x, union, row_mask)
        # Split the union into each tier's local rows (ascending: tier ids and the union both are), and move
        # every input to its tier BEFORE any launch: a device-to-host copy issued after the hot launch would
        # wait for the hot kernels on the stream and serialise the two tiers.
        which = self.tier_of[union.long()]  # (n,)
        work = []
        for ti, (t, ids) in enumerate(zip(self.tiers, self._ids_dev, strict=True)):
            rows = self.local[union[which == ti].long()]  # (n_t,) int32 ascending
            if rows.numel() == 0:
                continue
            mask = None if row_mask is None else row_mask[:, ids].to(t.device)  # (N, m_t)
            work.append((t, x.to(t.device), rows.to(t.device), mask))
        if not work:
            return torch.zeros_like(x, device=self.out_device)
        # Hot tier first (its CUDA kernels return at once), then the CPU computes the cold tier meanwhile.
        parts = [self._sparse(t, xt, rows, mask) for t, xt, rows, mask in work]  # (N, d) on its tier's device
        return self._sum(parts)
