"""The sparsity toolkit's subcommands of the ``sparseinfer`` CLI (calibrate, profile, train-predictor,
study). Each is registered here; its flag parsing and library call live beside the library code."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    """Add the toolkit's subcommands to the top-level parser's subparsers."""
    from sparseinfer.sparsity import calibrate_command

    calibrate_command.register(sub)
    from sparseinfer.sparsity import profile_command

    profile_command.register(sub)
    from sparseinfer.sparsity import predictor_command

    predictor_command.register(sub)
    from sparseinfer.sparsity import study_command

    study_command.register(sub)
