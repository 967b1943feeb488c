"""docs/activation_study.md, rendered from the study inputs saved beside it (no figure typed by hand).

Inputs, all under ``docs/activation_study/data/``: ``<variant>.study.json`` (``sparseinfer study``'s record),
``<variant>.train_log.json`` (the training run's log) and, when given, ``corpus_manifest.json``. ``render`` is
a pure function of those files, so the test re-renders the committed document and compares.
"""

from __future__ import annotations

import json
from pathlib import Path

from sparseinfer.sparsity.report import num, pct, ppl, signed_pct
from sparseinfer.training.study_claims import (
    LABELS,
    VARIANT_ORDER,
    cett_row,
    check_claims,
    predictor_means,
    skew_means,
)
from sparseinfer.training.study_figures import PLOT_FILES

DOC_NAME = "activation_study.md"
ASSET_DIR = "activation_study"
DATA_DIR = "data"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return [*out, *("| " + " | ".join(r) + " |" for r in rows), ""]


def load_inputs(asset_dir: Path) -> tuple[dict[str, dict], dict[str, dict], dict | None]:
    """(studies, train logs, corpus manifest) from ``asset_dir/data``; studies and logs keyed by variant."""
    data = asset_dir / DATA_DIR
    studies, logs = {}, {}
    for v in VARIANT_ORDER:
        study_file, log_file = data / f"{v}.study.json", data / f"{v}.train_log.json"
        if study_file.is_file():
            studies[v] = json.loads(study_file.read_text(encoding="utf-8"))
        if log_file.is_file():
            logs[v] = json.loads(log_file.read_text(encoding="utf-8"))
    manifest_file = data / "corpus_manifest.json"
    manifest = json.loads(manifest_file.read_text(encoding="utf-8")) if manifest_file.is_file() else None
    return studies, logs, manifest


def _img(key: str, alt: str) -> list[str]:
    return [f"![{alt}]({ASSET_DIR}/{PLOT_FILES[key]})", ""]


def _corpus(manifest: dict | None) -> list[str]:
    if manifest is None:
        return []
    lines = ["### Corpus", ""]
    rows = []
    for name, info in manifest.get("splits", {}).items():
        size = f"{info['bytes'] / 1e6:.2f} MB" if "bytes" in info else "—"
        tokens = f"{info['tokens']:,}" if "tokens" in info else "—"
        rows.append([name, size, tokens])
    if rows:
        lines += _table(["split", "size", "tokens"], rows)
    downloads = manifest.get("downloads") or manifest.get("archives") or manifest.get("sources") or {}
    if isinstance(downloads, dict) and downloads:
        lines += ["Sources and the sha256 recorded when they were fetched:", ""]
        for name, info in downloads.items():
            sha = info.get("sha256", "") if isinstance(info, dict) else ""
            lines.append(f"- `{name}`" + (f" — sha256 `{sha}`" if sha else ""))
        lines.append("")
    return lines


def _models(studies: dict[str, dict], logs: dict[str, dict]) -> list[str]:
    rows = []
    for v in (v for v in VARIANT_ORDER if v in studies):
        m, log = studies[v]["model"], logs.get(v, {})
        rows.append(
            [
                LABELS[v],
                "gated" if m["gated"] else "non-gated",
                str(m["intermediate_size"]),
                f"{log['params'] / 1e6:.2f} M" if "params" in log else "—",
                f"{log['tokens_seen'] / 1e6:.2f} M" if "tokens_seen" in log else "—",
                f"{log['wall_s'] / 60:.1f} min" if "wall_s" in log else "—",
                f"{log['val_perplexity']:.2f}" if "val_perplexity" in log else "—",
                ppl(studies[v]["dense"]["perplexity"]),
            ]
        )
    header = ["model", "FFN", "neurons m", "params", "tokens seen", "train wall", "val ppl", "study ppl"]
    first = next(iter(studies.values()))
    m, t = first["model"], first["text"]
    return [
        "### Models",
        "",
        f"All four: {m['num_layers']} layers, hidden {m['hidden_size']}, the same data order, token budget, "
        "schedule and seed; only the FFN differs. The gated variants get 2/3 of the non-gated neuron "
        "count so that FFN parameter counts match (PAPER.md). *val ppl* is the training run's validation "
        "split; *study ppl* is the dense perplexity the study measures on its held-out part "
        f"({t['heldout_sequences']} sequences, {t['heldout_tokens']} tokens, of `{Path(t['file']).name}`), "
        "the text every figure below "
        "comes from.",
        "",
        *_table(header, rows),
        *_recipe(logs),
    ]


def _recipe(logs: dict[str, dict]) -> list[str]:
    """The training flags shared by the four runs (from their train_log.json), as a reproduction command."""
    configs = [
        {k: v for k, v in log["config"].items() if k != "activation"}
        for log in logs.values()
        if "config" in log
    ]
    if not configs:
        return []
    shared = {k: v for k, v in configs[0].items() if all(c.get(k) == v for c in configs)}
    flags = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in shared.items())
    return [
        "Recipe (identical in the four train_log.json files; AdamW, linear warm-up, cosine decay, fp32 on "
        "the CPU), as the one-line reproduction:",
        "",
        f"    scripts/train_models.sh RUN_DIR {flags}",
        "",
    ]


PAPER_PARAMS, PAPER_TOKENS = 1.3e9, 100e9  # PAPER.md: 1.3B-parameter models, 100B tokens


def _scale(logs: dict[str, dict]) -> str:
    """How much smaller our runs are than the paper's, from the training logs."""
    params = [log["params"] for log in logs.values() if "params" in log]
    tokens = [log["tokens_seen"] for log in logs.values() if "tokens_seen" in log]
    if not params or not tokens:
        return "ours are far smaller and saw far fewer tokens"
    p, t = max(params), max(tokens)
    return (
        f"ours have {p / 1e6:.2f}M parameters ({PAPER_PARAMS / p:,.0f}× fewer) and saw {t / 1e6:.2f}M tokens "
        f"({PAPER_TOKENS / t:,.0f}× fewer), so they are far from converged"
    )


def _claims(studies: dict[str, dict], logs: dict[str, dict], default_cett: float) -> list[str]:
    claims = check_claims(studies, default_cett)
    holds = sum(c.verdict == "holds" for c in claims)
    return [
        "## The paper's claims beside ours",
        "",
        f"{holds} of {len(claims)} claims hold at this scale. Verdicts are computed from the figures by the "
        "rules in `server/sparseinfer/training/study_claims.py`. The paper's models have 1.3B parameters "
        f"and saw 100B tokens; {_scale(logs)}. Only directions and orders of magnitude can be expected to "
        "agree. Perplexity stands in for the paper's downstream-task scores.",
        "",
        *_table(["PAPER.md", "ours", "verdict"], [[c.paper, c.ours, f"**{c.verdict}**"] for c in claims]),
    ]


def _sparsity(studies: dict[str, dict], default_cett: float) -> list[str]:
    vs = [v for v in VARIANT_ORDER if v in studies]
    rows = []
    for v in vs:
        r = cett_row(studies[v], default_cett)
        rows.append([LABELS[v], pct(r["sparsity"]), ppl(r["perplexity"]), signed_pct(r["delta_perplexity"])])
    targets = [r["target"] for r in studies[vs[0]]["cett"]]
    sweep = []
    for t in targets:
        cells = [cett_row(studies[v], t) for v in vs]
        sweep.append(
            [f"{t:g}", *(f"{pct(c['sparsity'])} ({signed_pct(c['delta_perplexity'])})" for c in cells)]
        )
    return [
        f"## Sparsity at CETT {default_cett:g}",
        "",
        "Oracle mask: per-layer thresholds ε_l calibrated for the CETT target on the first part of the text; "
        "every inactive neuron of every layer dropped while measuring perplexity on the held-out part.",
        "",
        *_table(["model", "sparsity", "perplexity", "Δppl vs dense"], rows),
        "## Sparsity-perplexity trade-off over the CETT sweep",
        "",
        "Each cell: sparsity (perplexity change vs dense), oracle mask.",
        "",
        *_table(["CETT", *(LABELS[v] for v in vs)], sweep),
        *_img("sparsity_vs_cett", "sparsity vs CETT"),
        *_img("perplexity_vs_sparsity", "perplexity vs sparsity"),
    ]


def _predictors(studies: dict[str, dict]) -> list[str]:
    rows = []
    for v in (v for v in VARIANT_ORDER if v in studies):
        p, m = studies[v]["predictor"], predictor_means(studies[v])
        rows.append(
            [
                LABELS[v],
                str(p["rank"]),
                pct(m["recall"]),
                pct(m["min_recall"]),
                pct(m["predicted_sparsity"]),
                pct(p["run_sparsity"]),
                signed_pct(p["delta_perplexity"]),
            ]
        )
    first = next(iter(studies.values()))["predictor"]
    header = ["model", "rank", "recall", "worst layer", "predicted sparsity", "run sparsity", "Δppl vs dense"]
    return [
        f"## Predictors (CETT {first['cett_target']:g})",
        "",
        f"Low-rank predictors trained on the calibration part, recall target {first['recall_target']:g}. "
        "Recall and predicted sparsity are held-out layer means against the oracle labels; the last two "
        "columns run the model with every FFN computing only its predicted neurons.",
        "",
        *_table(header, rows),
        *_img("predictor", "predictor recall and predicted sparsity"),
    ]


def _affinity(studies: dict[str, dict]) -> list[str]:
    vs = [v for v in VARIANT_ORDER if v in studies]
    windows = studies[vs[0]]["affinity"]["windows"]
    reuse = [[LABELS[v], *(pct(r) for r in studies[v]["affinity"]["reuse"])] for v in vs]
    skew_rows = []
    for v in vs:
        s = skew_means(studies[v])
        gap = num(studies[v]["affinity"]["coactivation_gap"])
        skew_rows.append([LABELS[v], gap, *(pct(s[k]) for k in ("top10", "top20", "top50", "never_active"))])
    return [
        "## Reuse across tokens",
        "",
        "reuse(t) = |A_t ∩ (A_{t-1} ∪ … ∪ A_{t-k})| / |A_t|, layer mean, held-out text, default CETT.",
        "",
        *_table(["model", *(f"k={k}" for k in windows)], reuse),
        *_img("reuse_vs_window", "reuse vs window"),
        "## Co-activation gap and neuron-frequency skew",
        "",
        "Top-average co-activation gap (PAPER.md), and the share of all activations covered by the most "
        "frequently active 10/20/50% of neurons (uniform frequencies would give 10/20/50%); layer means.",
        "",
        *_table(["model", "co-activation gap", "top 10%", "top 20%", "top 50%", "never active"], skew_rows),
        *_img("neuron_frequency", "neuron activation frequency"),
    ]


def render(studies: dict[str, dict], logs: dict[str, dict], manifest: dict | None, command: str) -> str:
    """The whole document; ``command`` is the reproduction command line printed in it."""
    if not studies:
        raise ValueError("no study records to report on")
    default_cett = next(iter(studies.values()))["settings"]["default_cett"]
    lines = [
        "# Activation study: ReLU², ReLU, ReGLU and SwiGLU at small scale",
        "",
        "Every figure, table and verdict below is generated from the four checkpoints' study records by:",
        "",
        f"    {command}",
        "",
        "The models themselves come from `scripts/train_models.sh` (corpus, tokenizer and the four trainings "
        "in one line). The gated checkpoints (ReGLU, SwiGLU) load in `transformers` as `LlamaForCausalLM`; "
        "transformers' Llama has no non-gated MLP, so ReLU² and ReLU (gate and down projections only, the "
        "paper's form) load in sparseinfer's own loader only.",
        "",
        "## Setup",
        "",
        *_corpus(manifest),
        *_models(studies, logs),
    ]
    if all(v in studies for v in VARIANT_ORDER):
        lines += _claims(studies, logs, default_cett)
    lines += _sparsity(studies, default_cett) + _predictors(studies) + _affinity(studies)
    return "\n".join(lines).rstrip() + "\n"
