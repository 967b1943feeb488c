"""The training subcommands of the ``sparseinfer`` CLI: ``corpus`` and ``train`` (plus the activation study
and bundle commands of study_command.py / bundle.py, registered from here).

Flag parsing only; the work is in corpus.py, bpe.py and train.py. Bad flags raise ValueError
(one stderr line, exit 2, via ``cli.main``).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import fields
from pathlib import Path

from sparseinfer.training.train import VARIANTS, TrainConfig


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``corpus`` and ``train`` (and the study/bundle commands) to the top-level subparsers."""
    c = sub.add_parser(
        "corpus",
        help="fetch the public-domain corpus (apt/pip), clean, split, train the BPE tokenizer, tokenize",
    )
    c.add_argument(
        "out", type=Path, metavar="OUT_DIR", help="directory for the splits, tokenizer and manifest"
    )
    c.add_argument("--seed", type=int, default=0, help="seed of the chunk shuffle (default %(default)s)")
    c.add_argument("--vocab", type=int, default=8192, help="BPE vocabulary size (default %(default)s)")
    c.add_argument("--validation", type=float, default=0.02, help="share of the text (default %(default)s)")
    c.add_argument("--calibration", type=float, default=0.02, help="share of the text (default %(default)s)")
    c.set_defaults(run=_run_corpus)

    t = sub.add_parser("train", help="train a small Llama-style LM with one FFN variant on the corpus (CPU)")
    t.add_argument("--activation", required=True, choices=sorted(VARIANTS), help="FFN variant")
    t.add_argument("--corpus", type=Path, required=True, help="directory written by `sparseinfer corpus`")
    t.add_argument("--out", type=Path, required=True, help="checkpoint directory to write")
    defaults = TrainConfig()
    for f in fields(TrainConfig):
        if f.name == "activation":
            continue
        t.add_argument(
            f"--{f.name.replace('_', '-')}",
            type=type(getattr(defaults, f.name)),
            default=getattr(defaults, f.name),
            help="(default %(default)s)",
        )
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    t.add_argument(
        "--save-every",
        type=int,
        default=0,
        help="save the run's state every N steps (default: only on --stop-after)",
    )
    t.add_argument("--stop-after", type=int, default=None, help="stop after N steps of this run, state saved")
    t.add_argument("--resume", action="store_true", help="continue from OUT/train_state.pt")
    t.set_defaults(run=_run_train)

    from sparseinfer.training import bundle, study_command

    study_command.register(sub)
    bundle.register(sub)


def _run_corpus(args: argparse.Namespace, env: object) -> None:
    import numpy as np

    from sparseinfer.training.bpe import encode_file, train_tokenizer
    from sparseinfer.training.corpus import SPLITS, build_corpus

    for name in ("validation", "calibration"):
        if not 0.0 < getattr(args, name) < 0.5:
            raise ValueError(f"--{name} must be in (0, 0.5), got {getattr(args, name)}")
    manifest = build_corpus(
        args.out, seed=args.seed, fractions={"validation": args.validation, "calibration": args.calibration}
    )
    print(f"training the BPE tokenizer (vocab {args.vocab}) on train.txt", flush=True)
    tok = train_tokenizer([args.out / "train.txt"], args.vocab)
    tok.save(str(args.out / "tokenizer.json"))
    for split in SPLITS:
        ids = encode_file(tok, args.out / f"{split}.txt")
        np.save(args.out / f"{split}.npy", ids)
        manifest["splits"][split]["tokens"] = len(ids)
        print(f"{split}: {len(ids):,} tokens", flush=True)
    manifest["tokenizer"] = {"vocab_size": tok.get_vocab_size(), "type": "byte-level BPE"}
    (args.out / "manifest.json").write_text(json.dumps(manifest, indent=2))


def _run_train(args: argparse.Namespace, env: object) -> None:
    from sparseinfer.training.train import RunControl, train

    values = {f.name: getattr(args, f.name) for f in fields(TrainConfig) if f.name != "activation"}
    cfg = TrainConfig(activation=args.activation, **values)  # validates: ValueError names the field
    control = RunControl(save_every=args.save_every, stop_after=args.stop_after, resume=args.resume)
    train(cfg, args.corpus, args.out, progress=not args.no_progress, control=control)
