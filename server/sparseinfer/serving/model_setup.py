"""Load what a server serves: the checkpoint, its step-level ``Engine`` and its (static) description, the
``ModelInfo`` answer (``model_info.describe``).

The engine is the one ``engine.factory.load_engine`` builds, with per-request modes on: a sparse runtime is
installed whenever the checkpoint has a sparsity sidecar, so requests can choose oracle or predicted even
when the default is dense.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from sparseinfer.engine.generate import Engine
from sparseinfer.serving.config import ServeConfig
from sparseinfer.serving.model_info import ModelDescription, describe


@dataclass
class Served:
    """A loaded model ready to serve."""

    engine: Engine
    model_dir: Path
    description: ModelDescription


def model_directory(config: ServeConfig) -> Path:
    if config.model is not None:
        return config.model
    try:
        from sparseinfer.model.bundled import bundled_model_path
    except ImportError:
        raise FileNotFoundError(
            "no model is bundled with this installation; pass --model DIR (a checkpoint directory)"
        ) from None
    return bundled_model_path()


def load_served(config: ServeConfig) -> Served:
    """Load the checkpoint and build the engine sized by ``config.limits`` (``engine.factory``)."""
    from sparseinfer.engine.factory import load_engine

    config.validate()
    directory = model_directory(config)
    engine = load_engine(directory, config.engine_config())
    return Served(engine, directory, describe(config, engine, directory))
