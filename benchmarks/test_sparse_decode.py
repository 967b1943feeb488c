"""Sparse decode speed at batch 1: ``predicted`` mode vs ``dense`` on a LLaMA-7B-shaped bf16 model.

Run: ``pytest benchmarks/test_sparse_decode.py`` (not part of the plain ``pytest``: testpaths is tests/).
The measurement is ``sparseinfer.bench.decode.run_decode_bench``, the same code as
``sparseinfer bench decode`` (see that module for the model, the exact predictor and the method). Settings
from the environment: $SPARSEINFER_BENCH_ROUNDS (default 5), $SPARSEINFER_BENCH_THREADS (default torch's),
$SPARSEINFER_BENCH_LAYERS (default 4). The checkpoint is written once under /tmp and reused. Results go to
benchmarks/results/decode.{json,md}. No speed assertion: the figure and the target are in the table.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from sparseinfer.bench.decode import DecodeBenchConfig, format_table, run_decode_bench, write_results

RESULTS_DIR = Path(__file__).parent / "results"


def _config() -> DecodeBenchConfig:
    threads = os.environ.get("SPARSEINFER_BENCH_THREADS")
    return DecodeBenchConfig(
        layers=int(os.environ.get("SPARSEINFER_BENCH_LAYERS") or 4),
        rounds=int(os.environ.get("SPARSEINFER_BENCH_ROUNDS") or 5),
        threads=int(threads) if threads else None,
    )


def test_sparse_decode(benchmark):
    result = {}

    def measure() -> None:
        result.update(run_decode_bench(_config(), sys.stderr))

    # One pedantic call: the rounds (interleaved modes, medians) happen inside run_decode_bench.
    benchmark.pedantic(measure, rounds=1, iterations=1, warmup_rounds=0)
    benchmark.extra_info.update(result["meta"])
    for row in result["rows"]:
        benchmark.extra_info[row["mode"]] = row
    write_results(result, RESULTS_DIR)
    print("\n" + format_table(result))
