"""``sparseinfer bundle-model CHECKPOINT --text FILE --out DIR``: the shipped default model.

Converts a trained checkpoint to bf16 (half the bytes) and then builds its sparsity sidecar ON THE CONVERTED
FILES (calibrate at CETT 0.2, profile, train predictors): the sidecar records the fingerprint of the exact
safetensors it was made for, and bf16 weights give slightly different activations than the fp32 ones, so a
sidecar calibrated before the conversion would be both refused and wrong.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path
from typing import TextIO

import torch
from safetensors.torch import load_file, save_file

COPIED = ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "train_log.json")


def convert_checkpoint(src: Path, dst: Path, dtype: torch.dtype = torch.bfloat16) -> Path:
    """Write ``dst`` = ``src`` with every floating tensor in ``dtype`` and config.json saying so."""
    if not (src / "model.safetensors").is_file() or not (src / "config.json").is_file():
        raise ValueError(
            f"CHECKPOINT {src}: needs config.json and model.safetensors (a single-file checkpoint)"
        )
    dst.mkdir(parents=True, exist_ok=True)
    for stale in ("sparsity.json", "sparsity.safetensors"):  # a sidecar of other weights would be refused
        (dst / stale).unlink(missing_ok=True)
    tensors = {
        k: v.to(dtype) if v.is_floating_point() else v
        for k, v in load_file(src / "model.safetensors").items()
    }
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((src / "config.json").read_text())
    config["torch_dtype"] = str(dtype).removeprefix("torch.")
    (dst / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    for name in COPIED:
        if (src / name).is_file():
            shutil.copyfile(src / name, dst / name)
    return dst


def build_sidecar(
    model: Path,
    text: Path,
    cett: float = 0.2,
    seq_len: int = 256,
    tokens: int | None = None,
    epochs: int | None = None,
    out: TextIO = sys.stdout,
) -> None:
    """calibrate (CETT target) -> profile -> train-predictor, each writing its section of ``model``'s sidecar;
    ``tokens`` caps the text used, ``epochs`` the predictor training (None: the tools' defaults)."""
    from sparseinfer.sparsity.calibrate_command import ToolConfig, run_calibrate
    from sparseinfer.sparsity.predictor_command import TrainPredictorConfig, run_train_predictor
    from sparseinfer.sparsity.predictor_train import DEFAULT_BATCH_SIZE, DEFAULT_EPOCHS, DEFAULT_LR
    from sparseinfer.sparsity.profile_command import run_profile

    common = {"model": model, "text": text, "tokens": tokens, "seq_len": seq_len, "sidecar": None}
    calibrate = ToolConfig(command="calibrate", cett=cett, **common)
    calibrate.validate()
    run_calibrate(calibrate, out)
    run_profile(ToolConfig(command="profile", **common), out)
    predictor = TrainPredictorConfig(
        rank=None,
        recall=0.99,
        epochs=DEFAULT_EPOCHS if epochs is None else epochs,
        lr=DEFAULT_LR,
        batch_size=DEFAULT_BATCH_SIZE,
        seed=0,
        hidden_activation=None,
        **common,
    )
    predictor.validate()
    run_train_predictor(predictor, out)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bundle-model", help="convert a checkpoint to bf16 and build its sparsity sidecar")
    p.add_argument("checkpoint", type=Path, metavar="CHECKPOINT", help="trained checkpoint directory")
    p.add_argument("--text", type=Path, required=True, help="calibration text (UTF-8)")
    p.add_argument("--out", type=Path, required=True, help="directory to write (e.g. the package data dir)")
    p.add_argument("--cett", type=float, default=0.2, help="CETT target (default %(default)s)")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per sequence (default %(default)s)")
    p.add_argument("--tokens", type=int, default=None, help="use at most this many tokens of the text")
    p.add_argument(
        "--predictor-epochs", type=int, default=None, help="predictor epochs (default: the tool's)"
    )
    p.set_defaults(run=_run)


def _run(args: argparse.Namespace, env: object) -> None:
    if not args.checkpoint.is_dir():
        raise ValueError(f"CHECKPOINT {args.checkpoint}: not a directory")
    if not args.text.is_file():
        raise ValueError(f"--text {args.text}: no such file")
    if args.out.resolve() == args.checkpoint.resolve():
        raise ValueError("--out must differ from CHECKPOINT (the conversion rewrites the weights)")
    convert_checkpoint(args.checkpoint, args.out)
    build_sidecar(args.out, args.text, args.cett, args.seq_len, args.tokens, args.predictor_epochs)
    print(f"bundled {args.checkpoint} -> {args.out}")
