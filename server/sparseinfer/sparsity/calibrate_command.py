"""``sparseinfer calibrate MODEL --cett 0.2 --text FILE``, and what it shares with ``profile``
(``profile_command``): the flags, the frozen ``ToolConfig`` and the loading of model and text.

A thin layer: flags -> a frozen config -> ``calibrate.calibrate`` -> the sidecar, then a per-layer table on
stdout (progress bars go to stderr).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from sparseinfer.model.config import DTYPES
from sparseinfer.sparsity.calibrate import DEFAULT_CANDIDATES, DEFAULT_CETT, Calibration, validate_cett_target
from sparseinfer.sparsity.data import DEFAULT_SEQ_LEN, MIN_CALIBRATION_TOKENS


@dataclass(frozen=True)
class ToolConfig:
    command: str  # "calibrate" or "profile"
    model: Path
    text: Path
    tokens: int | None
    seq_len: int
    sidecar: Path | None
    cett: float = DEFAULT_CETT
    candidates: int = DEFAULT_CANDIDATES
    chunk: int = 2048
    dtype: str | None = None

    def validate(self) -> None:
        if self.command == "calibrate":
            validate_cett_target(self.cett)
        if self.tokens is not None and self.tokens < MIN_CALIBRATION_TOKENS:
            raise ValueError(f"--tokens must be ≥ {MIN_CALIBRATION_TOKENS}, got {self.tokens}")
        for name, value in (("--seq-len", self.seq_len), ("--chunk", self.chunk)):
            if value < 1:
                raise ValueError(f"{name} must be ≥ 1, got {value}")
        if self.candidates < 2:
            raise ValueError(f"--candidates must be ≥ 2, got {self.candidates}")
        if not self.model.is_dir():
            raise ValueError(f"MODEL {self.model}: not a directory")


def add_common_flags(p: argparse.ArgumentParser) -> None:
    """The flags ``calibrate`` and ``profile`` share."""
    p.add_argument("model", type=Path, metavar="MODEL", help="checkpoint directory")
    p.add_argument("--text", type=Path, required=True, metavar="FILE", help="calibration text (UTF-8)")
    p.add_argument("--tokens", type=int, default=None, metavar="N", help="use at most N tokens of the text")
    p.add_argument("--seq-len", type=int, default=DEFAULT_SEQ_LEN, help="tokens per calibration sequence")
    p.add_argument("--chunk", type=int, default=2048, help="tokens per matmul chunk (memory vs speed)")
    p.add_argument("--dtype", choices=sorted(DTYPES), help="compute dtype (default: the checkpoint's)")
    p.add_argument(
        "--sidecar", type=Path, default=None, metavar="DIR", help="sidecar directory (default: MODEL)"
    )


def register(sub: argparse._SubParsersAction) -> None:
    cal = sub.add_parser("calibrate", help="per-layer CETT thresholds ε_l, written to the sparsity sidecar")
    add_common_flags(cal)
    cal.add_argument("--cett", type=float, default=DEFAULT_CETT, help="CETT target in (0, 1) (default 0.2)")
    cal.add_argument(
        "--candidates", type=int, default=DEFAULT_CANDIDATES, help="quantile candidates per layer"
    )
    cal.set_defaults(run=_run)


def config_from_args(args: argparse.Namespace) -> ToolConfig:
    config = ToolConfig(
        command=args.command,
        model=args.model,
        text=args.text,
        tokens=args.tokens,
        seq_len=args.seq_len,
        sidecar=args.sidecar,
        cett=getattr(args, "cett", DEFAULT_CETT),
        candidates=getattr(args, "candidates", DEFAULT_CANDIDATES),
        chunk=args.chunk,
        dtype=args.dtype,
    )
    config.validate()
    return config


def load_for_tool(config: ToolConfig) -> tuple[Any, Any]:
    """The model (eval mode, in the config's dtype) and the calibration sequences of the config's text."""
    from sparseinfer.model import load_model, load_tokenizer
    from sparseinfer.sparsity.data import load_text_tokens

    sequences = load_text_tokens(load_tokenizer(config.model), config.text, config.tokens, config.seq_len)
    dtype = DTYPES[config.dtype] if config.dtype else None
    return load_model(config.model, dtype=dtype).eval(), sequences


def run_calibrate(config: ToolConfig, out: TextIO) -> Calibration:
    from sparseinfer.sparsity.calibrate import calibrate
    from sparseinfer.sparsity.data import text_sha256
    from sparseinfer.sparsity.sidecar import Sidecar

    sidecar = Sidecar.open(config.model, config.sidecar)  # fingerprint check before the expensive part
    model, sequences = load_for_tool(config)
    result = calibrate(model, sequences, config.cett, num_candidates=config.candidates, chunk=config.chunk)
    manifest = result.manifest(text_sha256=text_sha256(config.text), seq_len=sequences.shape[1])
    sidecar.set_section("calibration", result.tensors(), manifest)  # drops profile and predictor
    sidecar.save()
    out.write(
        f"calibrated {len(result.cett_per_layer)} layers on {result.num_tokens} tokens, "
        f"CETT target {result.cett_target:g}\n"
    )
    out.write("| layer | sparsity | CETT | ε |\n|---:|---:|---:|---:|\n")
    for i, (s, c, e) in enumerate(
        zip(result.sparsity_per_layer, result.cett_per_layer, result.thresholds.tolist(), strict=True)
    ):
        out.write(f"| {i} | {100 * s:.2f}% | {c:.4f} | {e:.4g} |\n")
    out.write(f"| mean | {100 * result.sparsity:.2f}% | {result.cett:.4f} | |\n")
    out.write(f"sidecar: {sidecar.directory}\n")
    return result


def _run(args: argparse.Namespace, env: object) -> None:
    run_calibrate(config_from_args(args), sys.stdout)
