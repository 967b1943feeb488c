"""``sparseinfer profile MODEL --text FILE``: per-neuron activation frequencies into the sidecar.

A thin layer: flags -> ``calibrate_command.ToolConfig`` -> ``profile.profile`` (with the calibrated
thresholds) -> the sidecar's profile section, then a per-layer skew table on stdout.
"""

from __future__ import annotations

import argparse
import sys
from typing import TextIO

from sparseinfer.sparsity.calibrate_command import (
    ToolConfig,
    add_common_flags,
    config_from_args,
    load_for_tool,
)
from sparseinfer.sparsity.profile import Profile


def register(sub: argparse._SubParsersAction) -> None:
    prof = sub.add_parser("profile", help="per-neuron activation frequencies (run `calibrate` first)")
    add_common_flags(prof)
    prof.set_defaults(run=lambda args, env: run_profile(config_from_args(args), sys.stdout))


def run_profile(config: ToolConfig, out: TextIO) -> Profile:
    from sparseinfer.sparsity.data import text_sha256
    from sparseinfer.sparsity.profile import profile
    from sparseinfer.sparsity.sidecar import Sidecar

    sidecar = Sidecar.load(config.model, sidecar_dir=config.sidecar)
    sidecar.require("calibration")
    thresholds = sidecar.thresholds.float()
    model, sequences = load_for_tool(config)
    if thresholds.numel() != len(model.layers):
        raise ValueError(f"sidecar thresholds has {thresholds.numel()} layers, the model {len(model.layers)}")
    result = profile(model, sequences, thresholds, chunk=config.chunk)
    sidecar.set_section("profile", result.tensors(), result.manifest(text_sha256=text_sha256(config.text)))
    sidecar.save()

    def pct(v: float) -> str:
        return "n/a" if v != v else f"{100 * v:.1f}%"

    out.write(
        f"profiled {len(model.layers)} layers on {result.num_tokens} tokens: share of activations "
        "covered by the most frequent neurons\n"
    )
    out.write("| layer | top 10% | top 20% | top 50% | never active |\n|---:|---:|---:|---:|---:|\n")
    rows = [*enumerate(result.skew()), ("mean", result.model_skew())]
    for name, r in rows:
        out.write(
            f"| {name} | {pct(r['top10'])} | {pct(r['top20'])} | {pct(r['top50'])} | "
            f"{pct(r['never_active'])} |\n"
        )
    out.write(f"sidecar: {sidecar.directory}\n")
    return result
