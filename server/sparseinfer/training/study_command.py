"""``sparseinfer activation-study MODEL_DIR... --text FILE --out docs``: run ``sparseinfer study`` on each of
four trained variants, keep their records, and write docs/activation_study.md + its PNGs from them.

Steps: for every model directory, ``sparsity.study.run_study`` into ``--work/<variant>`` (skipped with
``--reuse`` when that study.json exists); then ``study.json`` and the model's ``train_log.json`` are copied to
``docs/activation_study/data/`` and the document is rendered from those copies alone
(``--render-only`` re-renders from them without running anything).
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import sys
from pathlib import Path

from sparseinfer.training.study_claims import variant_of
from sparseinfer.training.study_figures import write_plots
from sparseinfer.training.study_render import ASSET_DIR, DATA_DIR, DOC_NAME, load_inputs, render

DEFAULT_COMMAND = (
    "sparseinfer activation-study models/relu2 models/relu models/reglu models/swiglu "
    "--text corpus/calibration.txt --corpus corpus --out docs"
)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "activation-study",
        help="run the sparsity study on the four trained variants and write docs/activation_study.md",
    )
    p.add_argument("models", type=Path, nargs="*", metavar="MODEL_DIR", help="checkpoint directories")
    p.add_argument(
        "--text", type=Path, help="study text (UTF-8; its tail is held out), e.g. corpus/calibration.txt"
    )
    p.add_argument("--out", type=Path, default=Path("docs"), help="docs directory (default %(default)s)")
    p.add_argument("--corpus", type=Path, default=None, help="corpus directory (its manifest.json is cited)")
    p.add_argument(
        "--work", type=Path, default=Path("study-runs"), help="per-model study outputs (default %(default)s)"
    )
    p.add_argument("--tokens", type=int, default=None, help="use at most this many tokens of the text")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per sequence (default %(default)s)")
    p.add_argument(
        "--batch-size", type=int, default=8, help="sequences per forward pass (default %(default)s)"
    )
    p.add_argument(
        "--predictor-epochs", type=int, default=10, help="predictor training epochs (default %(default)s)"
    )
    p.add_argument("--reuse", action="store_true", help="reuse an existing study.json under --work")
    p.add_argument("--render-only", action="store_true", help="only re-render from --out's saved data")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(run=_run)


def run_studies(args: argparse.Namespace) -> None:
    """Run (or reuse) each model's study and copy its record and training log into the doc's data dir."""
    from sparseinfer.model.loader import read_config_json
    from sparseinfer.sparsity.study import run_study

    if not args.models:
        raise ValueError("MODEL_DIR: give the four checkpoint directories (or use --render-only)")
    if args.text is None or not args.text.is_file():
        raise ValueError(f"--text {args.text}: no such file")
    data = args.out / ASSET_DIR / DATA_DIR
    data.mkdir(parents=True, exist_ok=True)
    for model in args.models:
        if not model.is_dir():
            raise ValueError(f"MODEL_DIR {model}: not a directory")
        read_config_json(model)  # a clear error for a directory that is not a checkpoint
        work = args.work / model.resolve().name
        study_file = work / "study.json"
        if not (args.reuse and study_file.is_file()):
            print(f"studying {model} -> {work}", file=sys.stderr)
            run_study(
                model,
                args.text,
                work,
                tokens=args.tokens,
                seq_len=args.seq_len,
                batch_size=args.batch_size,
                predictor_epochs=args.predictor_epochs,
                progress=not args.no_progress,
            )
        record = json.loads(study_file.read_text(encoding="utf-8"))
        variant = variant_of(record["model"])
        shutil.copyfile(study_file, data / f"{variant}.study.json")
        if (model / "train_log.json").is_file():
            shutil.copyfile(model / "train_log.json", data / f"{variant}.train_log.json")
    if args.corpus is not None:
        manifest = args.corpus / "manifest.json"
        if not manifest.is_file():
            raise ValueError(f"--corpus {args.corpus}: no manifest.json")
        shutil.copyfile(manifest, data / "corpus_manifest.json")


def write_doc(out: Path, command: str) -> Path:
    """Render docs/activation_study.md and its plots from ``out/activation_study/data``."""
    asset_dir = out / ASSET_DIR
    studies, logs, manifest = load_inputs(asset_dir)
    if not studies:
        raise ValueError(f"{asset_dir / DATA_DIR}: no <variant>.study.json to report on")
    write_plots(studies, asset_dir)
    doc = out / DOC_NAME
    doc.write_text(render(studies, logs, manifest, command), encoding="utf-8")
    (asset_dir / DATA_DIR / "command.txt").write_text(command + "\n", encoding="utf-8")
    return doc


def _run(args: argparse.Namespace, env: object) -> None:
    if args.render_only:
        saved = args.out / ASSET_DIR / DATA_DIR / "command.txt"
        command = saved.read_text(encoding="utf-8").strip() if saved.is_file() else DEFAULT_COMMAND
    else:
        run_studies(args)
        command = (
            "sparseinfer " + shlex.join(sys.argv[1:])
            if sys.argv[1:2] == ["activation-study"]
            else DEFAULT_COMMAND
        )
    print(f"wrote {write_doc(args.out, command)}")
