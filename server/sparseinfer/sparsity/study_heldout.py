"""The study's held-out measurements at one calibrated target: affinity (reuse ratio for windows 1..K and the
top-average co-activation gap per layer), neuron activation frequencies and their skew, and the predictors'
recall / precision / predicted sparsity against the oracle labels.

One streaming pass (``capture.layerwise_ffn_inputs``) over the held-out sequences of the DENSE model: layer
l's FFN inputs are what the dense model feeds it, so the labels are exactly the oracle's for that layer (the
same convention as calibration and predictor training). Memory per layer: the FFN inputs (N × d), the active
mask (N × m bool) and the co-activation counts (m × m float32: 485 MB for m = 11008); one layer at a time.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from sparseinfer.model import Transformer
from sparseinfer.sparsity.capture import layerwise_ffn_inputs
from sparseinfer.sparsity.neurons import active_mask, output_norms
from sparseinfer.sparsity.perplexity import PredictorLike

SKEW_FRACTIONS = {"top10": 0.1, "top20": 0.2, "top50": 0.5}
CURVE_POINTS = 101  # the sorted frequency curve is stored at 0%, 1%, …, 100% of the layer's neurons


@dataclass
class HeldoutMeasurements:
    windows: list[int]
    reuse_per_layer: list[list[float]] = field(default_factory=list)  # [layer][window index]
    coactivation_gap_per_layer: list[float] = field(default_factory=list)
    skew_per_layer: list[dict[str, float]] = field(default_factory=list)
    curve_positions: list[float] = field(default_factory=list)
    sorted_curve_per_layer: list[list[float]] = field(default_factory=list)
    frequencies: list[torch.Tensor] = field(default_factory=list)  # (m,) per layer, kept in memory only
    predictor_layers: list[dict[str, float]] = field(default_factory=list)


def frequency_skew(freq: torch.Tensor) -> dict[str, float]:
    """``profile.top_share`` for 10/20/50% (the share of all activations covered by the most frequent
    ceil(f·m) neurons; NaN for a layer that never fires) and the share of neurons never active."""
    from sparseinfer.sparsity.profile import top_share

    out = {name: top_share(freq, f) for name, f in SKEW_FRACTIONS.items()}
    out["never_active"] = float((freq == 0).double().mean())
    return out


def sorted_curve(freq: torch.Tensor, points: int = CURVE_POINTS) -> tuple[list[float], list[float]]:
    """The frequencies sorted high to low, sampled at ``points`` evenly spaced ranks (both ends included)."""
    ordered = freq.float().sort(descending=True).values
    positions = torch.linspace(0, 1, points)
    index = (positions * (freq.numel() - 1)).round().long()
    return positions.tolist(), ordered[index].tolist()


@torch.no_grad()
def measure_heldout(
    model: Transformer,
    sequences: torch.Tensor,
    thresholds: torch.Tensor,
    windows: list[int],
    predictor_set: PredictorLike | None = None,
    chunk: int = 4096,
    progress: bool = True,
) -> HeldoutMeasurements:
    """Every per-layer figure of the study that needs the active masks of the held-out tokens."""
    from sparseinfer.sparsity.metrics import coactivation_gap, reuse_ratio

    n_seq, T = sequences.shape
    result = HeldoutMeasurements(windows=list(windows))
    stream = layerwise_ffn_inputs(model, sequences, progress=False)
    for layer, x in tqdm(stream, total=len(model.layers), desc="held-out metrics", disable=not progress):
        ffn = model.layers[layer].mlp
        norms, eps = output_norms(ffn), float(thresholds[layer])
        tp = fp = fn = 0
        masks = []
        for xc in x.split(chunk):
            active = active_mask(ffn.neuron_activations(xc), norms, eps)  # (c, m) bool
            masks.append(active)
            if predictor_set is not None:
                predicted = predictor_set.predict(layer, xc).to(active.device)  # (c, m) bool
                tp += int((predicted & active).sum())
                fp += int((predicted & ~active).sum())
                fn += int((~predicted & active).sum())
        active = torch.cat(masks)  # (N, m) bool, rows sequence-major
        del masks
        m = active.shape[1]

        # Reuse windows never cross a sequence boundary: the sequences are separate texts' windows.
        result.reuse_per_layer.append([float(reuse_ratio(active.view(n_seq, T, m), k)) for k in windows])
        result.coactivation_gap_per_layer.append(float(coactivation_gap(active)))
        freq = active.float().mean(0)  # (m,)
        result.frequencies.append(freq)
        result.skew_per_layer.append({"layer": layer, **frequency_skew(freq)})
        result.curve_positions, curve = sorted_curve(freq)
        result.sorted_curve_per_layer.append(curve)
        if predictor_set is not None:
            pairs = active.numel()
            positives, predicted_pos = tp + fn, tp + fp
            result.predictor_layers.append(
                {
                    "layer": layer,
                    "recall": tp / positives if positives else 1.0,  # vacuous when nothing is active
                    "precision": tp / predicted_pos if predicted_pos else 1.0,
                    "predicted_sparsity": 1.0 - predicted_pos / pairs,
                    "true_sparsity": 1.0 - positives / pairs,
                }
            )
        del active
    return result
