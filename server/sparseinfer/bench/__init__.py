"""``sparseinfer bench kernels | decode | serve``: side-by-side measurements: a table plus JSON.

Each subcommand lives in its own module here and registers itself in ``register`` below; the pytest-benchmark
suites under ``benchmarks/`` reuse the same measurement functions, so the CLI and the suites cannot disagree.
"""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``bench`` command group to the top-level parser's subparsers."""
    bench = sub.add_parser("bench", help="benchmarks: sparse kernels, decode, the gRPC server under load")
    bench_sub = bench.add_subparsers(dest="bench_command", required=True, metavar="BENCH")
    # One line per benchmark module (each defines register(bench_sub)):
    from sparseinfer.bench import decode

    decode.register(bench_sub)
    from sparseinfer.bench import serve

    serve.register(bench_sub)
    from sparseinfer.bench import kernels

    kernels.register(bench_sub)
    from sparseinfer.bench import bundled

    bundled.register(bench_sub)
    from sparseinfer.bench import llamacpp

    llamacpp.register(bench_sub)
