"""The study's PNG plots, drawn from the study's JSON record alone (so they can be redrawn from study.json).

Every plot has a title, labelled axes with units, and a legend where there is more than one series. matplotlib
runs on the Agg backend (files only, no display needed); figures are closed after saving so a long study does
not accumulate them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # before pyplot: headless servers have no display
import matplotlib.pyplot as plt

PLOT_FILES = {
    "sparsity_vs_cett": "sparsity_vs_cett.png",
    "perplexity_vs_sparsity": "perplexity_vs_sparsity.png",
    "layer_sparsity": "layer_sparsity.png",
    "reuse_vs_window": "reuse_vs_window.png",
    "neuron_frequency": "neuron_frequency.png",
}
# Beyond this many layers a per-layer legend is unreadable: the lines are drawn thin and unlabelled.
_MAX_LAYER_LINES = 12
_DPI = 120


def _layer_style(num_layers: int, index: int) -> dict[str, Any]:
    cmap = plt.get_cmap("viridis")
    colour = cmap(0.85 * index / max(1, num_layers - 1))  # viridis ends in a pale yellow, unreadable on white
    if num_layers > _MAX_LAYER_LINES:
        return {"color": colour, "linewidth": 0.8, "alpha": 0.6}
    return {"color": colour, "linewidth": 1.2, "label": f"layer {index}"}


def _save(fig: plt.Figure, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=_DPI)
    plt.close(fig)
    return path


def _title(result: dict[str, Any], what: str) -> str:
    return f"{what}\n{result['model']['name']} ({result['model']['activation']})"


def plot_sparsity_vs_cett(result: dict[str, Any], path: Path) -> Path:
    rows = result["cett"]
    targets = [r["target"] for r in rows]
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    num_layers = result["model"]["num_layers"]
    for layer in range(num_layers):
        ax.plot(
            targets, [100 * r["sparsity_per_layer"][layer] for r in rows], **_layer_style(num_layers, layer)
        )
    ax.plot(
        targets, [100 * r["sparsity"] for r in rows], "o-", color="black", linewidth=2.2, label="model mean"
    )
    ax.set_xscale("log")
    ax.set_xticks(targets, [f"{t:g}" for t in targets])
    ax.minorticks_off()
    ax.set_xlabel("CETT target (log scale)")
    ax.set_ylabel("sparsity on held-out text (% neurons inactive)")
    ax.set_title(_title(result, "Sparsity vs CETT target (oracle mask)"))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_perplexity_vs_sparsity(result: dict[str, Any], path: Path) -> Path:
    rows = result["cett"]
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    xs = [100 * r["sparsity"] for r in rows]
    ys = [r["perplexity"] for r in rows]
    ax.plot(xs, ys, "o-", color="tab:blue", label="oracle mask (one point per CETT target)")
    for r, x, y in zip(rows, xs, ys, strict=True):
        ax.annotate(f"{r['target']:g}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.axhline(result["dense"]["perplexity"], color="gray", linestyle="--", label="dense (no truncation)")
    pred = result.get("predictor")
    if pred:
        ax.plot(
            [100 * pred["run_sparsity"]],
            [pred["perplexity"]],
            "s",
            color="tab:red",
            markersize=8,
            label=f"predicted mask (CETT {pred['cett_target']:g})",
        )
    ax.set_xlabel("sparsity on held-out text (% neurons inactive)")
    ax.set_ylabel("perplexity on held-out text")
    ax.set_title(_title(result, "Perplexity vs sparsity"))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_layer_sparsity(result: dict[str, Any], path: Path) -> Path:
    rows = result["cett"]
    layers = list(range(result["model"]["num_layers"]))
    fig, ax = plt.subplots(figsize=(7.6, 4.4))
    cmap = plt.get_cmap("plasma")
    for i, r in enumerate(rows):
        colour = cmap(0.85 * i / max(1, len(rows) - 1))
        ax.plot(
            layers,
            [100 * s for s in r["sparsity_per_layer"]],
            "o-",
            color=colour,
            markersize=3,
            label=f"CETT {r['target']:g}",
        )
    ax.set_xlabel("layer")
    ax.set_ylabel("sparsity on held-out text (% neurons inactive)")
    if len(layers) <= 32:
        ax.set_xticks(layers)
    ax.set_title(_title(result, "Per-layer sparsity (oracle mask)"))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))  # outside: lines span the width
    return _save(fig, path)


def plot_reuse_vs_window(result: dict[str, Any], path: Path) -> Path:
    aff = result["affinity"]
    windows = aff["windows"]
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    num_layers = len(aff["reuse_per_layer"])
    for layer, curve in enumerate(aff["reuse_per_layer"]):
        ax.plot(windows, [100 * v for v in curve], **_layer_style(num_layers, layer))
    ax.plot(windows, [100 * v for v in aff["reuse"]], "o-", color="black", linewidth=2.2, label="model mean")
    ax.set_xticks(windows)
    ax.set_xlabel("window k (previous tokens)")
    ax.set_ylabel("reuse: active neurons already active in window (%)")
    ax.set_title(_title(result, f"Neuron reuse vs window (CETT {aff['cett_target']:g}, held-out text)"))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_neuron_frequency(result: dict[str, Any], path: Path) -> Path:
    freq = result["frequency"]
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    positions = [100 * p for p in freq["curve_positions"]]
    num_layers = len(freq["sorted_curve_per_layer"])
    for layer, curve in enumerate(freq["sorted_curve_per_layer"]):
        ax.plot(positions, [100 * v for v in curve], **_layer_style(num_layers, layer))
    ax.set_xlabel("neurons, most to least frequently active (% of the layer)")
    ax.set_ylabel("activation frequency (% of held-out tokens)")
    ax.set_title(_title(result, f"Neuron activation frequency, sorted (CETT {freq['cett_target']:g})"))
    ax.grid(alpha=0.3)
    if num_layers <= _MAX_LAYER_LINES:
        ax.legend(fontsize=8)
    return _save(fig, path)


_PLOTTERS = {
    "sparsity_vs_cett": plot_sparsity_vs_cett,
    "perplexity_vs_sparsity": plot_perplexity_vs_sparsity,
    "layer_sparsity": plot_layer_sparsity,
    "reuse_vs_window": plot_reuse_vs_window,
    "neuron_frequency": plot_neuron_frequency,
}


def write_plots(result: dict[str, Any], out_dir: str | Path) -> dict[str, Path]:
    """Draw every plot of ``PLOT_FILES`` into ``out_dir``; returns name -> path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    return {name: plotter(result, out / PLOT_FILES[name]) for name, plotter in _PLOTTERS.items()}
