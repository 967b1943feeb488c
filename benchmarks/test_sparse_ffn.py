"""Sparse FFN op (with its predictor) vs the dense torch FFN, LLaMA-7B and paper shapes, plus bandwidth.

Run: ``pytest benchmarks/test_sparse_ffn.py`` (not part of the plain ``pytest``: testpaths is tests/).
The measurement is ``sparseinfer.bench.kernels.run_kernel_bench``, the same code as
``sparseinfer bench kernels`` (see ``sparseinfer.bench.kernels_measure`` for the method). Settings from the
environment: $SPARSEINFER_BENCH_QUICK=1 (bf16, batch 1 and 4, 3 repeats), $SPARSEINFER_BENCH_REPEATS
(default: the CLI's, 3), $SPARSEINFER_BENCH_THREADS (default torch's). Results go to
benchmarks/results/kernels.{json,md}.
No speed assertion: the figures and the targets are in the table.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from sparseinfer.bench.kernels import quick_config, run_kernel_bench, write_results
from sparseinfer.bench.kernels_measure import KernelBenchConfig

RESULTS_DIR = Path(__file__).parent / "results"


def _config() -> KernelBenchConfig:
    threads = os.environ.get("SPARSEINFER_BENCH_THREADS")
    config = KernelBenchConfig(
        repeats=int(os.environ.get("SPARSEINFER_BENCH_REPEATS") or KernelBenchConfig.repeats),
        threads=int(threads) if threads else None,
    )
    return quick_config(config) if os.environ.get("SPARSEINFER_BENCH_QUICK") == "1" else config


def test_sparse_ffn_kernels(benchmark):
    result = {}

    def measure() -> None:
        result.update(run_kernel_bench(_config(), sys.stderr))

    # One pedantic call: the repeats (interleaved variants, medians) happen inside run_kernel_bench.
    benchmark.pedantic(measure, rounds=1, iterations=1, warmup_rounds=0)
    benchmark.extra_info.update({k: v for k, v in result["meta"].items() if k != "config"})
    for row in result["rows"]:
        key = f"{row['shape']}/{row['dtype']}/B{row['batch']}/s{row['sparsity']:g}"
        benchmark.extra_info[key + "/speedup"] = round(row["speedup"], 3)
        benchmark.extra_info[key + "/kernel_bw_share"] = round(row["kernel_bw_share"], 3)
    write_results(result, RESULTS_DIR)
