"""The study's markdown report, written from the study's JSON record alone: no figure is typed by hand, each
one is the record's number formatted by the helpers below (which the tests use to find them in the text)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

REPORT_FILE = "report.md"


def pct(x: float) -> str:
    """A share in [0, 1] as a percentage with two decimals: 0.91234 -> '91.23%'."""
    return f"{100 * x:.2f}%"


def ppl(x: float) -> str:
    """A perplexity with four decimals (enough to see a 0.01% change at perplexities of a few hundred)."""
    return f"{x:.4f}"


def signed_pct(x: float) -> str:
    return f"{100 * x:+.2f}%"


def num(x: float) -> str:
    return f"{x:.4f}"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return [*lines, ""]


def _setup(result: dict[str, Any]) -> list[str]:
    m, t, s = result["model"], result["text"], result["settings"]
    return [
        f"# Sparsity study: {m['name']}",
        "",
        f"- model: `{m['path']}` — {m['num_layers']} layers, hidden {m['hidden_size']}, "
        f"{m['intermediate_size']} neurons per FFN, activation `{m['activation']}`, "
        f"{'gated' if m['gated'] else 'non-gated'} FFN, dtype {m['dtype']}",
        f"- text: `{t['file']}` (sha256 `{t['sha256'][:16]}…`), sequences of {t['seq_len']} tokens: "
        f"{t['calibration_sequences']} for calibration ({t['calibration_tokens']} tokens), "
        f"{t['heldout_sequences']} held out for evaluation ({t['heldout_tokens']} tokens); "
        f"split: {t['split']}",
        f"- CETT targets: {', '.join(f'{c:g}' for c in s['cett_targets'])}; default target "
        f"{s['default_cett']:g} (predictor, reuse, co-activation, frequency)",
        f"- run time: {result['timing']['total_s']:.1f} s",
        "",
        "Definitions are PAPER.md's: neuron i is active for a token iff |h_i|·‖W_out[:, i]‖₂ ≥ ε_l; "
        "sparsity is the share of inactive (token, neuron) pairs; ε_l is calibrated on the calibration split "
        "only and every figure below is measured on the held-out split. Oracle perplexity runs the model "
        "with the inactive neurons really dropped in every layer at once.",
        "",
    ]


def _cett_section(result: dict[str, Any]) -> list[str]:
    dense = result["dense"]["perplexity"]
    lines = [
        "## Sparsity and perplexity vs CETT (oracle mask)",
        "",
        f"Dense perplexity: **{ppl(dense)}**",
        "",
    ]
    rows = [
        [f"{r['target']:g}", pct(r["sparsity"]), ppl(r["perplexity"]), signed_pct(r["delta_perplexity"])]
        for r in result["cett"]
    ]
    lines += _table(["CETT target", "sparsity", "perplexity", "Δppl vs dense"], rows)
    lines += [
        "![sparsity vs CETT](sparsity_vs_cett.png)",
        "",
        "![perplexity vs sparsity](perplexity_vs_sparsity.png)",
        "",
    ]
    lines += ["### Per-layer sparsity", ""]
    header = ["layer"] + [f"CETT {r['target']:g}" for r in result["cett"]]
    layer_rows = [
        [str(layer)] + [pct(r["sparsity_per_layer"][layer]) for r in result["cett"]]
        for layer in range(result["model"]["num_layers"])
    ]
    lines += _table(header, layer_rows)
    lines += ["### CETT reached on the calibration split", ""]
    cal_rows = [
        [str(layer)] + [num(r["calibration_cett_per_layer"][layer]) for r in result["cett"]]
        for layer in range(result["model"]["num_layers"])
    ]
    lines += _table(header, cal_rows)
    lines += ["![per-layer sparsity](layer_sparsity.png)", ""]
    return lines


def _predictor_section(result: dict[str, Any]) -> list[str]:
    p = result.get("predictor")
    if not p:
        return []
    lines = [
        f"## Predicted mask (CETT {p['cett_target']:g})",
        "",
        f"Predictors: {p['source']}, rank {p['rank']}, recall target {p['recall_target']:g}. "
        f"Perplexity with every FFN computing only its predicted neurons: **{ppl(p['perplexity'])}** "
        f"({signed_pct(p['delta_perplexity'])} vs dense, {signed_pct(p['delta_vs_oracle'])} vs the oracle "
        f"mask at the same target), sparsity during that run {pct(p['run_sparsity'])}.",
        "",
        "Recall, precision and predicted sparsity below are measured on the held-out split, against the "
        "oracle labels of the dense model's FFN inputs.",
        "",
    ]
    rows = [
        [
            str(r["layer"]),
            pct(r["recall"]),
            pct(r["precision"]),
            pct(r["predicted_sparsity"]),
            pct(r["true_sparsity"]),
            f"{r['size_percent']:.2f}%",
        ]
        for r in p["layers"]
    ]
    return lines + _table(
        ["layer", "recall", "precision", "predicted sparsity", "true sparsity", "size (% of FFN)"], rows
    )


def _affinity_section(result: dict[str, Any]) -> list[str]:
    a = result["affinity"]
    lines = [
        f"## Hardware affinity (CETT {a['cett_target']:g}, held-out text)",
        "",
        "Reuse(t) = |A_t ∩ (A_{t-1} ∪ … ∪ A_{t-k})| / |A_t|, averaged over the tokens with a full window "
        "inside their sequence and at least one active neuron; the co-activation gap is "
        "(1/m) Σ_i max_j M_ij − (1/m²) Σ_i Σ_j M_ij over the neurons active at least once (`metrics.py`).",
        "",
        "### Reuse vs window",
        "",
    ]
    header = ["layer"] + [f"k={k}" for k in a["windows"]]
    rows = [[str(i)] + [pct(v) for v in curve] for i, curve in enumerate(a["reuse_per_layer"])]
    rows.append(["mean"] + [pct(v) for v in a["reuse"]])
    lines += _table(header, rows)
    lines += ["![reuse vs window](reuse_vs_window.png)", "", "### Co-activation gap per layer", ""]
    rows = [[str(i), num(g)] for i, g in enumerate(a["coactivation_gap_per_layer"])]
    rows.append(["mean", num(a["coactivation_gap"])])
    return lines + _table(["layer", "top-average co-activation gap"], rows)


def _frequency_section(result: dict[str, Any]) -> list[str]:
    f = result["frequency"]
    lines = [
        f"## Neuron activation frequency (CETT {f['cett_target']:g}, held-out text)",
        "",
        "Share of all activations covered by the most frequently active 10/20/50% of a layer's neurons "
        "(hot-neuron skew), and the share of neurons never active on the held-out text.",
        "",
    ]
    rows = [
        [str(s["layer"]), pct(s["top10"]), pct(s["top20"]), pct(s["top50"]), pct(s["never_active"])]
        for s in f["skew_per_layer"]
    ]
    lines += _table(["layer", "top 10%", "top 20%", "top 50%", "never active"], rows)
    return [*lines, "![neuron frequency](neuron_frequency.png)", ""]


def render_report(result: dict[str, Any]) -> str:
    """The markdown text of the report for a study record (``StudyResult.to_dict()`` / study.json)."""
    sections = [_setup, _cett_section, _predictor_section, _affinity_section, _frequency_section]
    return "\n".join(line for section in sections for line in section(result))


def write_report(result: dict[str, Any], out_dir: str | Path) -> Path:
    path = Path(out_dir) / REPORT_FILE
    path.write_text(render_report(result), encoding="utf-8")
    return path
