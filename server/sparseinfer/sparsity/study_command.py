"""``sparseinfer study MODEL --text FILE --cett 0.01,0.02,...``: the sparsity / perplexity trade-off study.

A thin layer: flags -> ``study.StudyConfig`` -> ``study.run_study_config``; prints where the report went and
the headline figures. Bad flags raise ValueError (one stderr line, exit 2, via ``cli.main``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TextIO

from sparseinfer.model.config import DTYPES
from sparseinfer.sparsity.study import (
    DEFAULT_CETT,
    PAPER_CETT_TARGETS,
    PREDICTOR_SOURCES,
    StudyConfig,
    StudyResult,
    cett_list,
    run_study_config,
    validate_cett,
)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "study",
        help="sparsity and perplexity vs CETT, predictor, reuse, co-activation: a markdown report with plots",
    )
    p.add_argument("model", type=Path, help="checkpoint directory")
    p.add_argument("--text", type=Path, required=True, help="UTF-8 text; its tail is held out for evaluation")
    p.add_argument(
        "--cett",
        default=",".join(f"{c:g}" for c in PAPER_CETT_TARGETS),
        help="comma-separated CETT targets in (0, 1) (default: the paper's sweep %(default)s)",
    )
    p.add_argument(
        "--default-cett",
        type=float,
        default=DEFAULT_CETT,
        help="target for the predictor, reuse, co-activation and frequency figures (default %(default)s)",
    )
    p.add_argument("--tokens", type=int, default=None, help="use at most this many tokens of the text")
    p.add_argument("--seq-len", type=int, default=512, help="tokens per sequence (default %(default)s)")
    p.add_argument(
        "--heldout", type=float, default=0.25, help="share of the sequences held out (default %(default)s)"
    )
    p.add_argument("--out", type=Path, default=None, help="output directory (default: ./study-<model name>)")
    p.add_argument(
        "--batch-size", type=int, default=8, help="sequences per forward pass (default %(default)s)"
    )
    p.add_argument(
        "--predictors",
        choices=PREDICTOR_SOURCES,
        default="train",
        help="train predictors on the calibration split, or use the sidecar's when trained on other text",
    )
    p.add_argument("--rank", type=int, default=None, help="predictor rank (default: ~6%% of the FFN's size)")
    p.add_argument("--recall", type=float, default=0.99, help="predictor recall target (default %(default)s)")
    p.add_argument("--dtype", choices=sorted(DTYPES), help="compute dtype (default: the checkpoint's)")
    p.add_argument("--sidecar", type=Path, default=None, help="sidecar directory (default: the checkpoint's)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(run=_run)


def config_from_args(args: argparse.Namespace) -> StudyConfig:

    if not args.model.is_dir():
        raise ValueError(f"MODEL {args.model}: not a directory")
    if args.tokens is not None and args.tokens < 1:
        raise ValueError(f"--tokens must be ≥ 1, got {args.tokens}")
    try:
        validate_cett(args.default_cett)
    except ValueError as e:
        raise ValueError(f"--default-cett: {e}") from None
    config = StudyConfig(
        model_path=args.model,
        text_file=args.text,
        out_dir=args.out if args.out is not None else Path(f"study-{args.model.resolve().name}"),
        cett_targets=cett_list(args.cett),
        default_cett=args.default_cett,
        tokens=args.tokens,
        seq_len=args.seq_len,
        heldout_fraction=args.heldout,
        batch_size=args.batch_size,
        predictors=args.predictors,
        predictor_rank=args.rank,
        recall_target=args.recall,
        dtype=DTYPES[args.dtype] if args.dtype else None,
        sidecar_dir=args.sidecar,
        progress=not args.no_progress,
    )
    config.validate()
    return config


def print_summary(result: StudyResult, out: TextIO) -> None:
    d = result.data
    out.write(
        f"dense perplexity {d['dense']['perplexity']:.4f} on {d['text']['heldout_tokens']} held-out tokens\n"
    )
    for r in d["cett"]:
        out.write(
            f"CETT {r['target']:<5g} sparsity {100 * r['sparsity']:6.2f}%  perplexity {r['perplexity']:.4f} "
            f"({100 * r['delta_perplexity']:+.2f}%)\n"
        )
    p = d["predictor"]
    out.write(
        f"predicted mask (CETT {p['cett_target']:g}): sparsity {100 * p['run_sparsity']:.2f}%  perplexity "
        f"{p['perplexity']:.4f} ({100 * p['delta_perplexity']:+.2f}%)\n"
    )
    out.write(f"report: {result.files['report']}\n")


def _run(args: argparse.Namespace, env: object) -> None:
    result = run_study_config(config_from_args(args))
    print_summary(result, sys.stdout)
