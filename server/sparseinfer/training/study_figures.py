"""Comparison plots of the four variants, drawn from their study records alone (one line per variant).

Same conventions as ``sparsity.plots``: Agg backend, titles, axis units, legends, figures closed after saving.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # before pyplot: headless machines have no display
import matplotlib.pyplot as plt

from sparseinfer.training.study_claims import LABELS, VARIANT_ORDER, predictor_means

PLOT_FILES = {
    "sparsity_vs_cett": "sparsity_vs_cett.png",
    "perplexity_vs_sparsity": "perplexity_vs_sparsity.png",
    "predictor": "predictor.png",
    "reuse_vs_window": "reuse_vs_window.png",
    "neuron_frequency": "neuron_frequency.png",
}
_COLOURS = {"relu2": "#d62728", "relu": "#1f77b4", "reglu": "#2ca02c", "swiglu": "#9467bd"}
_DPI = 110


def _save(fig: plt.Figure, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=_DPI)
    plt.close(fig)
    return path


def _variants(studies: dict[str, dict[str, Any]]) -> list[str]:
    return [v for v in VARIANT_ORDER if v in studies]


def _line_plot(
    studies: dict[str, dict[str, Any]], path: Path, xy: Any, labels: tuple[str, str, str], log_x: bool = False
) -> Path:
    """One line per variant; ``xy(study) -> (xs, ys)``; labels = (x label, y label, title)."""
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for v in _variants(studies):
        xs, ys = xy(studies[v])
        ax.plot(xs, ys, "o-", color=_COLOURS[v], label=LABELS[v], markersize=3)
    if log_x:
        ax.set_xscale("log")
    ax.set(xlabel=labels[0], ylabel=labels[1], title=labels[2])
    ax.grid(True, alpha=0.3)
    ax.legend()
    return _save(fig, path)


def plot_sparsity_vs_cett(studies: dict[str, dict[str, Any]], path: Path) -> Path:
    def xy(s: dict[str, Any]) -> tuple[list[float], list[float]]:
        return [r["target"] for r in s["cett"]], [100 * r["sparsity"] for r in s["cett"]]

    labels = ("CETT target (log scale)", "sparsity on held-out text (%)", "Sparsity vs CETT (oracle mask)")
    return _line_plot(studies, path, xy, labels, log_x=True)


def plot_perplexity_vs_sparsity(studies: dict[str, dict[str, Any]], path: Path) -> Path:
    def xy(s: dict[str, Any]) -> tuple[list[float], list[float]]:
        return [100 * r["sparsity"] for r in s["cett"]], [100 * r["delta_perplexity"] for r in s["cett"]]

    labels = ("sparsity (%)", "perplexity rise vs dense (%)", "Sparsity-perplexity trade-off (CETT sweep)")
    return _line_plot(studies, path, xy, labels)


def plot_reuse(studies: dict[str, dict[str, Any]], path: Path) -> Path:
    def xy(s: dict[str, Any]) -> tuple[list[float], list[float]]:
        return s["affinity"]["windows"], [100 * r for r in s["affinity"]["reuse"]]

    labels = ("window k (previous tokens)", "reuse ratio (%)", "Active-set reuse vs window")
    return _line_plot(studies, path, xy, labels)


def plot_frequency(studies: dict[str, dict[str, Any]], path: Path) -> Path:
    def xy(s: dict[str, Any]) -> tuple[list[float], list[float]]:
        f = s["frequency"]
        curves = f["sorted_curve_per_layer"]
        mean = [sum(c[i] for c in curves) / len(curves) for i in range(len(curves[0]))]  # layer mean
        return [100 * p for p in f["curve_positions"]], [100 * c for c in mean]

    labels = (
        "neuron rank, most to least often active (% of neurons)",
        "activation frequency (% of tokens)",
        "Neuron activation frequency (layer mean)",
    )
    return _line_plot(studies, path, xy, labels)


def plot_predictor(studies: dict[str, dict[str, Any]], path: Path) -> Path:
    variants = _variants(studies)
    means = [predictor_means(studies[v]) for v in variants]
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    x = list(range(len(variants)))
    w = 0.38
    ax.bar([i - w / 2 for i in x], [100 * m["recall"] for m in means], w, label="recall", color="#444444")
    predicted = [100 * m["predicted_sparsity"] for m in means]
    ax.bar([i + w / 2 for i in x], predicted, w, label="predicted sparsity", color="#e377c2")
    ax.set_xticks(x, [LABELS[v] for v in variants])
    ax.set(ylabel="held-out, mean over layers (%)", title="Predictors at the default CETT")
    ax.set_ylim(0, 105)
    ax.legend(loc="lower right")
    return _save(fig, path)


def write_plots(studies: dict[str, dict[str, Any]], out_dir: Path) -> dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    draw = {
        "sparsity_vs_cett": plot_sparsity_vs_cett,
        "perplexity_vs_sparsity": plot_perplexity_vs_sparsity,
        "predictor": plot_predictor,
        "reuse_vs_window": plot_reuse,
        "neuron_frequency": plot_frequency,
    }
    return {name: fn(studies, out_dir / PLOT_FILES[name]) for name, fn in draw.items()}
