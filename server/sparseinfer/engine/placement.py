"""Hot/cold neuron placement: which FFN neurons live on the fast device under a memory budget.

PAPER.md, "Hot neurons": a few neurons fire for most tokens. Given each neuron's activation frequency (the
sidecar's ``profile`` section) and a GPU memory budget, the dense parts (attention, embeddings, norms,
lm_head, predictors and the KV cache for max_batch × max_seq) are placed first; the bytes left are filled with
the neurons that serve the most expected activations per byte. A neuron's cost is its weight rows (gate, up
when gated, and its down-projection column), the same for every neuron of a layer, so the knapsack is solved
exactly by a greedy pass in order of frequency / bytes (a prefix of that order is optimal when all layers
share one shape, the only case the model runtime supports).

Budget rules: a budget smaller than the dense parts places everything on the CPU (budget 0 = CPU only); a
budget that holds every neuron places the whole model on the fast device. Without a GPU the "hot" device is
the CPU as well, so the split (and the hybrid execution that follows it) still runs and is tested.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch

from sparseinfer.model.quant import BYTES_PER_WEIGHT
from sparseinfer.model.transformer import Transformer

_UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}
_MEMORY = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-zA-Z]*)\s*$")


def parse_memory(text: str, name: str = "--gpu-memory") -> int:
    """Bytes from "4GiB", "512MB", "1.5 GiB", "1048576" or "0"; ValueError naming ``name`` otherwise.

    KB/MB/GB/TB are powers of 1000, KiB/MiB/GiB/TiB of 1024; units are case-insensitive."""
    match = _MEMORY.match(text)
    unit = match.group(2).lower() if match else ""
    if match is None or unit not in _UNITS:
        raise ValueError(
            f"{name}: cannot read {text!r} as a memory size; write e.g. 4GiB, 512MB, 1073741824 or 0 "
            f"(units: {', '.join(u for u in _UNITS if u)})"
        )
    return math.floor(float(match.group(1)) * _UNITS[unit])


def neuron_bytes(model: Transformer, weights: str | None = None) -> int:
    """Weight bytes of one FFN neuron: its gate row, up row (gated FFNs) and down-projection column, in
    ``weights`` (a ``model.quant`` format, or "checkpoint": the model dtype); None: as the model has them."""
    mlp = model.layers[0].mlp
    rows = 3 if model.config.ffn_gated else 2
    if weights is None:  # a dense FFN's in-projection, stacked with the up one or not (FFN.fuse_gate_up)
        proj = getattr(mlp, "gate_up_proj", None) or getattr(mlp, "gate_proj", None)
        weights = getattr(proj, "fmt", "checkpoint")
    per = BYTES_PER_WEIGHT[weights] if weights != "checkpoint" else model.dtype.itemsize
    return round(rows * model.config.hidden_size * per)


def ffn_parameter_names(model: Transformer) -> set[str]:
    return {n for n, _ in model.named_parameters() if ".mlp." in n}


def dense_bytes(model: Transformer, max_batch: int, max_seq: int, predictor_bytes: int = 0) -> int:
    """Bytes the fast device needs before any FFN neuron: every non-FFN parameter (tied weights once), the
    KV cache for ``max_batch`` × ``max_seq`` and the predictors."""
    seen: set[int] = set()
    params = 0
    ffn = ffn_parameter_names(model)
    for name, p in model.named_parameters():
        if name in ffn or id(p) in seen:
            continue
        seen.add(id(p))
        params += p.numel() * p.element_size()
    c = model.config
    kv = 2 * c.num_layers * max_batch * c.num_kv_heads * max_seq * c.head_dim * model.dtype.itemsize
    return params + kv + predictor_bytes


@dataclass(frozen=True)
class Placement:
    """Where everything lives. ``hot[l]`` holds layer l's hot neuron ids (int64, ascending)."""

    hot_device: torch.device  # the fast device ("cuda" when there is one, else the CPU)
    dense_on_hot: bool  # the dense parts (and the KV cache) live on hot_device; else on the CPU
    hot: tuple[torch.Tensor, ...]
    budget: int
    dense_bytes: int
    hot_bytes: int  # FFN bytes placed hot
    cold_bytes: int  # FFN bytes left on the CPU
    expected_hot_share: float  # Σ frequency of hot neurons / Σ frequency (1.0 when all are hot)

    @property
    def dense_device(self) -> torch.device:
        return self.hot_device if self.dense_on_hot else torch.device("cpu")

    def summary(self) -> str:
        hot = sum(int(h.numel()) for h in self.hot)
        return (
            f"placement: budget {format_bytes(self.budget)} on {self.hot_device}; dense parts "
            f"{format_bytes(self.dense_bytes)} on {self.dense_device}; {hot} hot neurons "
            f"({format_bytes(self.hot_bytes)}), cold {format_bytes(self.cold_bytes)} on cpu; "
            f"expected hot share of activations {self.expected_hot_share:.1%}"
        )


def format_bytes(n: int) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} B"


def default_hot_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def plan_placement(
    frequency: torch.Tensor | None,
    num_layers: int,
    num_neurons: int,
    bytes_per_neuron: int,
    budget: int,
    dense: int,
    hot_device: torch.device | None = None,
) -> Placement:
    """Choose the hot neurons of every layer.

    frequency: (L, m) activation frequencies (the profile), or None when the budget needs none (0, or enough
    for everything); a partial split without one is a ValueError naming ``sparseinfer profile``.
    """
    if budget < 0:
        raise ValueError(f"--gpu-memory must be ≥ 0 bytes, got {budget}")
    device = hot_device if hot_device is not None else default_hot_device()
    total_ffn = num_layers * num_neurons * bytes_per_neuron
    none = torch.empty(0, dtype=torch.long)
    if budget < dense or budget == 0:
        hot = tuple(none for _ in range(num_layers))
        return Placement(device, False, hot, budget, dense, 0, total_ffn, 0.0)
    free = budget - dense
    if free >= total_ffn:
        hot = tuple(torch.arange(num_neurons) for _ in range(num_layers))
        return Placement(device, True, hot, budget, dense, total_ffn, 0, 1.0)
    if frequency is None:
        raise ValueError(
            "a partial hot/cold split needs neuron frequencies: the sparsity sidecar has no profile "
            "section; run `sparseinfer profile MODEL --text FILE` first"
        )
    freq = frequency.detach().float().cpu()
    if freq.shape != (num_layers, num_neurons):
        raise ValueError(
            f"profile frequency has shape {tuple(freq.shape)}, expected ({num_layers}, {num_neurons})"
        )
    # Equal item sizes: the best set under the budget is the `count` most frequent neurons over all layers.
    count = free // bytes_per_neuron
    flat = freq.flatten()  # (L·m,)
    order = torch.sort(flat, descending=True, stable=True).indices[:count]  # (count,)
    chosen = torch.zeros(flat.numel(), dtype=torch.bool)
    chosen[order] = True
    chosen = chosen.view(num_layers, num_neurons)
    hot = tuple(chosen[li].nonzero().flatten() for li in range(num_layers))
    total = float(flat.double().sum())
    share = float(flat[order].double().sum()) / total if total > 0 else 0.0
    hot_bytes = int(count) * bytes_per_neuron
    return Placement(device, True, hot, budget, dense, hot_bytes, total_ffn - hot_bytes, share)
