"""The sparsity study (``sparseinfer study``): the paper's trade-off curve for one checkpoint, measured on
held-out text.

Protocol:
1. The text is tokenized and cut into equal sequences (``data.load_text_tokens``); the LAST
   ``ceil(heldout_fraction · N_seq)`` sequences are held out, the rest calibrate. The split is by position in
   the text, so it is deterministic and the two parts never share a token.
2. Dense perplexity on the held-out sequences.
3. For each CETT target: ε_l calibrated on the calibration split; then perplexity on the held-out sequences
   with every inactive neuron of every layer really dropped (``masking.oracle_truncation``), and the sparsity
   that run saw (per layer and mean: inactive (token, neuron) pairs / all pairs).
4. At the default target (added to the sweep if absent): predictors trained on the calibration split (or, with
   ``predictors="sidecar"``, loaded from the checkpoint's sidecar), perplexity with the predicted mask, and
   their recall / precision / predicted sparsity on the held-out tokens; reuse for windows 1..5, the
   co-activation gap and the neuron activation frequencies on the held-out tokens (``study_heldout``).
5. ``out_dir``: study.json (every number), report.md and the PNG plots, both drawn from study.json alone.

The study never writes the checkpoint's sidecar: its thresholds are those of its own calibration split.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from tqdm.auto import tqdm

from sparseinfer.model import Transformer, load_model, load_tokenizer
from sparseinfer.sparsity.capture import layerwise_ffn_inputs
from sparseinfer.sparsity.perplexity import perplexity, predicted_truncation
from sparseinfer.sparsity.study_heldout import measure_heldout

if TYPE_CHECKING:
    from sparseinfer.sparsity.calibrate import Calibration

PAPER_CETT_TARGETS = (0.01, 0.02, 0.04, 0.1, 0.2, 0.3, 0.4, 0.5)
DEFAULT_CETT = 0.2  # the paper's best trade-off
REUSE_WINDOWS = (1, 2, 3, 4, 5)
STUDY_FILE = "study.json"
PREDICTOR_SOURCES = ("train", "sidecar")


@dataclass(frozen=True)
class StudyConfig:
    model_path: Path
    text_file: Path
    out_dir: Path
    cett_targets: tuple[float, ...] = PAPER_CETT_TARGETS
    default_cett: float = DEFAULT_CETT
    tokens: int | None = None  # cap on the tokens read from the text (calibration + held-out); None = all
    seq_len: int = 512
    heldout_fraction: float = 0.25
    batch_size: int = 8
    # "train" on the calibration split, or "sidecar" (the checkpoint's, if trained on other text)
    predictors: str = "train"
    predictor_rank: int | None = None
    recall_target: float = 0.99
    predictor_epochs: int | None = None  # None = predictor_train's default
    dtype: torch.dtype | None = None
    sidecar_dir: Path | None = None
    progress: bool = True

    def validate(self) -> None:
        if not self.cett_targets:
            raise ValueError("cett_targets is empty: give at least one CETT target")
        for c in (*self.cett_targets, self.default_cett):
            validate_cett(c)
        if not 0.0 < self.heldout_fraction < 1.0:
            raise ValueError(f"heldout_fraction must be in (0, 1), got {self.heldout_fraction}")
        if self.seq_len < 2:
            raise ValueError(f"seq_len must be ≥ 2 (perplexity needs a next token), got {self.seq_len}")
        if self.predictors not in PREDICTOR_SOURCES:
            raise ValueError(f"predictors must be one of {PREDICTOR_SOURCES}, got {self.predictors!r}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be ≥ 1, got {self.batch_size}")


@dataclass
class StudyResult:
    """The study's record (``data`` is exactly what study.json holds) and the files written."""

    data: dict[str, Any]
    out_dir: Path
    files: dict[str, Path]

    def to_dict(self) -> dict[str, Any]:
        return self.data


def validate_cett(value: float) -> float:
    if not (0.0 < value < 1.0):  # also rejects NaN
        raise ValueError(f"CETT target must be in (0, 1), got {value}")
    return value


def split_heldout(sequences: torch.Tensor, heldout_fraction: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(calibration, held-out): the last ceil(fraction · N) sequences are held out; both parts non-empty."""
    n = sequences.shape[0]
    n_heldout = math.ceil(heldout_fraction * n)
    if n < 2 or n_heldout >= n:
        raise ValueError(
            f"the text gives {n} sequence(s) of {sequences.shape[1]} tokens: the study needs at least 2 (one "
            "to calibrate on, one held out); use a longer --text, more --tokens or a shorter --seq-len"
        )
    return sequences[: n - n_heldout], sequences[n - n_heldout :]


def calibrate_targets(
    model: Transformer, sequences: torch.Tensor, targets: Sequence[float], progress: bool = True
) -> dict[float, Calibration]:
    """``calibrate.calibrate(model, sequences, t)`` for every target t, with ONE capture pass: each layer's
    FFN inputs are computed once and every target's threshold is searched on them (a per-target generator
    seeded like ``calibrate``'s, so each result equals a separate ``calibrate`` call)."""
    from sparseinfer.sparsity.calibrate import Calibration, calibrate_layer

    generators = {t: torch.Generator().manual_seed(0) for t in targets}
    layers: dict[float, list[Any]] = {t: [] for t in targets}
    for li, x in layerwise_ffn_inputs(model, sequences, progress=progress):
        for t in tqdm(targets, desc=f"calibrate layer {li}", disable=not progress, leave=False):
            layers[t].append(
                calibrate_layer(model.layers[li].mlp, x, t, generator=generators[t], desc=f"layer {li}")
            )
    return {
        t: Calibration(
            thresholds=torch.tensor([c.threshold for c in cal], dtype=torch.float32),
            sparsity_per_layer=[c.sparsity for c in cal],
            cett_per_layer=[c.cett for c in cal],
            cett_target=t,
            num_tokens=sequences.numel(),
            num_candidates=cal[0].candidates.numel(),
        )
        for t, cal in layers.items()
    }


def _oracle_run(
    model: Transformer, sequences: torch.Tensor, thresholds: torch.Tensor, cfg: StudyConfig
) -> tuple[float, list[float]]:
    """Perplexity with the oracle mask and the per-layer sparsity of that run."""
    from sparseinfer.sparsity.masking import oracle_truncation

    with oracle_truncation(model, thresholds) as record:
        value = perplexity(model, sequences, cfg.batch_size, cfg.progress, desc="oracle ppl")
    return value, [float(s) for s in record.layer_sparsity()]


def _load_sidecar_predictors(cfg: StudyConfig, text_sha: str) -> Any | None:
    """The sidecar's predictors when they exist for this model and were not trained on the study's text (whose
    held-out part they could have seen); otherwise None (the study then trains its own)."""
    from sparseinfer.sparsity.predictor import PredictorSet
    from sparseinfer.sparsity.sidecar import Sidecar

    if not Sidecar.exists(cfg.sidecar_dir or cfg.model_path):
        return None
    sidecar = Sidecar.load(cfg.model_path, sidecar_dir=cfg.sidecar_dir)
    if not sidecar.has("predictor") or not sidecar.has("calibration"):
        return None
    calibration = sidecar.sections["calibration"]
    if calibration.get("text_sha256") == text_sha or calibration.get("cett_target") != cfg.default_cett:
        return None
    return PredictorSet.from_state(sidecar.section_tensors("predictor"), sidecar.sections["predictor"])


def _predictors(
    model: Transformer, calibration: torch.Tensor, thresholds: torch.Tensor, cfg: StudyConfig, text_sha: str
) -> tuple[Any, str]:
    if cfg.predictors == "sidecar":
        loaded = _load_sidecar_predictors(cfg, text_sha)
        if loaded is not None:
            return loaded, "loaded from the checkpoint's sidecar"
    from sparseinfer.sparsity.predictor_train import train_predictors

    kwargs: dict[str, Any] = {
        "rank": cfg.predictor_rank,
        "recall_target": cfg.recall_target,
        "progress": cfg.progress,
    }
    if cfg.predictor_epochs is not None:
        kwargs["epochs"] = cfg.predictor_epochs
    return train_predictors(model, calibration, thresholds, **kwargs), "trained on the calibration split"


def _model_record(cfg: StudyConfig, model: Transformer) -> dict[str, Any]:
    c = model.config
    return {
        "name": cfg.model_path.resolve().name,
        "path": str(cfg.model_path),
        "num_layers": c.num_layers,
        "hidden_size": c.hidden_size,
        "intermediate_size": c.intermediate_size,
        "activation": c.activation,
        "gated": bool(c.ffn_gated),
        "dtype": str(model.dtype).removeprefix("torch."),
    }


def run_study(
    model_path: str | Path,
    text_file: str | Path,
    out_dir: str | Path,
    cett_targets: Sequence[float] = PAPER_CETT_TARGETS,
    default_cett: float = DEFAULT_CETT,
    tokens: int | None = None,
    heldout_fraction: float = 0.25,
    **options: Any,
) -> StudyResult:
    """Run the whole study; ``options`` are the other ``StudyConfig`` fields (seq_len, batch_size, ...)."""
    cfg = StudyConfig(
        model_path=Path(model_path),
        text_file=Path(text_file),
        out_dir=Path(out_dir),
        cett_targets=tuple(cett_targets),
        default_cett=default_cett,
        tokens=tokens,
        heldout_fraction=heldout_fraction,
        **options,
    )
    return run_study_config(cfg)


def run_study_config(cfg: StudyConfig) -> StudyResult:
    """Run the whole study and write study.json, report.md and the plots into ``cfg.out_dir``."""
    from sparseinfer.sparsity.data import load_text_tokens, text_sha256

    cfg.validate()
    start = time.perf_counter()
    targets = sorted(set(cfg.cett_targets) | {cfg.default_cett})
    tokenizer = load_tokenizer(cfg.model_path)
    model = load_model(cfg.model_path, dtype=cfg.dtype).eval()
    sequences = load_text_tokens(tokenizer, cfg.text_file, num_tokens=cfg.tokens, seq_len=cfg.seq_len)
    calibration, heldout = split_heldout(sequences, cfg.heldout_fraction)
    text_sha = text_sha256(cfg.text_file)

    dense = perplexity(model, heldout, cfg.batch_size, cfg.progress, desc="dense ppl")
    rows, calibrations = [], calibrate_targets(model, calibration, targets, cfg.progress)
    for target in tqdm(targets, desc="oracle-mask runs", disable=not cfg.progress):
        thresholds = calibrations[target].thresholds
        value, layer_sparsity = _oracle_run(model, heldout, thresholds, cfg)
        rows.append(
            {
                "target": target,
                "thresholds": thresholds.tolist(),
                "calibration_cett_per_layer": [float(c) for c in calibrations[target].cett_per_layer],
                "calibration_sparsity_per_layer": [float(c) for c in calibrations[target].sparsity_per_layer],
                "sparsity": sum(layer_sparsity) / len(layer_sparsity),
                "sparsity_per_layer": layer_sparsity,
                "perplexity": value,
                "delta_perplexity": value / dense - 1.0,
            }
        )

    eps = calibrations[cfg.default_cett].thresholds
    predictor_set, source = _predictors(model, calibration, eps, cfg, text_sha)
    with predicted_truncation(model, predictor_set) as counts:
        predicted_ppl = perplexity(model, heldout, cfg.batch_size, cfg.progress, desc="predicted-mask ppl")
    run_sparsity = counts.layer_sparsity()
    held = measure_heldout(model, heldout, eps, list(REUSE_WINDOWS), predictor_set, progress=cfg.progress)
    oracle_default = next(r for r in rows if r["target"] == cfg.default_cett)
    sizes = {r.layer: r.size_percent for r in getattr(predictor_set, "reports", [])}
    pred_layers = [{**p, "size_percent": sizes.get(p["layer"], float("nan"))} for p in held.predictor_layers]

    data: dict[str, Any] = {
        "model": _model_record(cfg, model),
        "text": {
            "file": str(cfg.text_file),
            "sha256": text_sha,
            "seq_len": int(sequences.shape[1]),
            "calibration_sequences": int(calibration.shape[0]),
            "heldout_sequences": int(heldout.shape[0]),
            "calibration_tokens": int(calibration.numel()),
            "heldout_tokens": int(heldout.numel()),
            "split": f"first {calibration.shape[0]} sequences calibrate, "
            f"last {heldout.shape[0]} are held out",
        },
        "settings": {
            "cett_targets": targets,
            "default_cett": cfg.default_cett,
            "heldout_fraction": cfg.heldout_fraction,
            "batch_size": cfg.batch_size,
            "perplexity": "exp(mean next-token NLL over all T-1 predicted positions of every held-out "
            "sequence)",
        },
        "dense": {"perplexity": dense},
        "cett": rows,
        "predictor": {
            "cett_target": cfg.default_cett,
            "source": source,
            "rank": int(predictor_set.rank),
            "recall_target": float(predictor_set.recall_target),
            "score_thresholds": [float(t) for t in predictor_set.score_thresholds],
            "perplexity": predicted_ppl,
            "delta_perplexity": predicted_ppl / dense - 1.0,
            "delta_vs_oracle": predicted_ppl / oracle_default["perplexity"] - 1.0,
            "run_sparsity": sum(run_sparsity) / len(run_sparsity),
            "run_sparsity_per_layer": run_sparsity,
            "layers": pred_layers,
        },
        "affinity": {
            "cett_target": cfg.default_cett,
            "windows": held.windows,
            "reuse_per_layer": held.reuse_per_layer,
            "reuse": [sum(col) / len(col) for col in zip(*held.reuse_per_layer, strict=True)],
            "coactivation_gap_per_layer": held.coactivation_gap_per_layer,
            "coactivation_gap": sum(held.coactivation_gap_per_layer) / len(held.coactivation_gap_per_layer),
        },
        "frequency": {
            "cett_target": cfg.default_cett,
            "skew_per_layer": held.skew_per_layer,
            "curve_positions": held.curve_positions,
            "sorted_curve_per_layer": held.sorted_curve_per_layer,
        },
    }
    data["timing"] = {"total_s": time.perf_counter() - start}
    return write_outputs(data, cfg.out_dir)


def write_outputs(data: dict[str, Any], out_dir: str | Path) -> StudyResult:
    """study.json, then the plots and report.md drawn from it (also redraws from a saved study.json)."""
    from sparseinfer.sparsity.plots import write_plots
    from sparseinfer.sparsity.report import write_report

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    study_file = out / STUDY_FILE
    study_file.write_text(json.dumps(data, indent=2, allow_nan=True) + "\n", encoding="utf-8")
    files = {"study": study_file, **write_plots(data, out), "report": write_report(data, out)}
    return StudyResult(data, out, files)


def cett_list(text: str) -> tuple[float, ...]:
    """Parse ``0.01,0.02,0.2`` into CETT targets, each in (0, 1); ValueError naming the bad entry."""
    values: list[float] = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            raise ValueError(f"--cett {text!r}: empty entry (expected comma-separated numbers like 0.1,0.2)")
        try:
            value = float(part)
        except ValueError:
            raise ValueError(f"--cett {text!r}: {part!r} is not a number") from None
        if not (0.0 < value < 1.0):
            raise ValueError(f"--cett {text!r}: {part} is outside (0, 1)")
        values.append(value)
    return tuple(values)
