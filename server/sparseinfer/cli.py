"""The ``sparseinfer`` command line: a thin layer that parses flags into one frozen config for the library.

Defined here: ``generate`` (stream a completion to stdout, a summary to stderr; the bundled model unless
``--model``) and ``random-checkpoint`` (a tiny random checkpoint for tests and experiments). The other command
groups register from their own packages: serving (``serve``), sparsity (``calibrate``, ``profile``,
``train-predictor``, ``study``), training (``corpus``, ``train``, ``activation-study``, ``bundle-model``) and
``bench``. User errors (bad flags, a bad checkpoint, invalid sampling parameters) print one line to stderr
and exit 2, without a traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

import torch

from sparseinfer.engine.sampling import SamplingParams
from sparseinfer.model.config import DTYPES, SUPPORTED_ACTIVATIONS
from sparseinfer.model.quant import WEIGHT_FORMATS

if TYPE_CHECKING:
    from sparseinfer.engine.factory import EngineConfig

EXIT_USAGE = 2


class UsageError(Exception):
    """A problem with what the user asked for: reported as one line, exit status 2."""


@dataclass(frozen=True)
class Environment:
    """Everything the CLI takes from environment variables, read once by ``read_environment``."""

    model: str | None = None  # SPARSEINFER_MODEL: default for --model
    auth_token: str | None = None  # SPARSEINFER_AUTH_TOKEN: default for `serve --auth-token`
    dense_linear: str = "auto"  # SPARSEINFER_DENSE_LINEAR: auto | torch | rows | N (model.linear)
    hugepages: bool = True  # SPARSEINFER_HUGEPAGES=0 keeps CPU weights out of huge pages (engine.hugepages)

    def engine_config(self, **fields: Any) -> EngineConfig:
        """An ``engine.factory.EngineConfig`` of ``fields`` with this environment's settings."""
        from sparseinfer.engine.factory import EngineConfig
        from sparseinfer.engine.modes import SparsityConfig

        sparsity = fields.pop("sparsity", SparsityConfig())
        sparsity = dataclasses.replace(sparsity, hugepages=self.hugepages)
        return EngineConfig(sparsity=sparsity, dense_linear=self.dense_linear, **fields)


def read_environment(environ: Mapping[str, str] | None = None) -> Environment:
    """The one place environment variables are read (at run time, never at import)."""
    from sparseinfer.model.linear import check_choice

    env = os.environ if environ is None else environ
    dense_linear = (env.get("SPARSEINFER_DENSE_LINEAR") or "auto").strip().lower()
    try:
        check_choice(dense_linear)
    except ValueError as e:
        raise UsageError(f"SPARSEINFER_DENSE_LINEAR: {e}") from None
    return Environment(
        model=env.get("SPARSEINFER_MODEL") or None,
        auth_token=env.get("SPARSEINFER_AUTH_TOKEN") or None,
        dense_linear=dense_linear,
        hugepages=(env.get("SPARSEINFER_HUGEPAGES") or "1").strip() != "0",
    )


@dataclass(frozen=True)
class GenerateConfig:
    model: Path
    prompt: str
    params: SamplingParams
    engine: EngineConfig  # max_seq is sized by run_generate for this one request


@dataclass(frozen=True)
class RandomCheckpointConfig:
    path: Path
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    activation: str
    gated: bool
    tie: bool
    dtype: torch.dtype
    seed: int
    max_position_embeddings: int


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sparseinfer", description="Serve and run activation-sparse LLMs.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    gen = sub.add_parser("generate", help="stream a completion for one prompt to stdout")
    gen.add_argument(
        "--model", help="checkpoint directory (default: $SPARSEINFER_MODEL, else the bundled ReLU² model)"
    )
    gen.add_argument("--prompt", required=True)
    defaults = SamplingParams()
    gen.add_argument("--max-new-tokens", type=int, default=defaults.max_new_tokens)
    gen.add_argument("--temperature", type=float, default=defaults.temperature, help="0 = greedy")
    gen.add_argument("--top-k", type=int, default=defaults.top_k, help="0 = off")
    gen.add_argument("--top-p", type=float, default=defaults.top_p, help="1.0 = off")
    gen.add_argument(
        "--repetition-penalty", type=float, default=defaults.repetition_penalty, help="1.0 = off"
    )
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument(
        "--stop", nargs="+", default=[], metavar="STR", help="stop when any of these strings appears"
    )
    gen.add_argument("--ignore-eos", action="store_true", help="keep generating past end-of-sequence tokens")
    gen.add_argument("--dtype", choices=sorted(DTYPES), help="compute dtype (default: the checkpoint's)")
    gen.add_argument(
        "--weights",
        choices=WEIGHT_FORMATS,
        default="checkpoint",
        help="decoder weights in the checkpoint's dtype, or quantized at load to ggml's q8_0 or q4_0 blocks",
    )
    gen.add_argument("--threads", type=_positive_int, help="CPU threads for torch (default: torch's choice)")
    gen.add_argument(
        "--sparsity",
        choices=("dense", "oracle", "predicted"),
        default="dense",
        help="FFN execution: dense, oracle (true active set from the sidecar's calibration: the quality "
        "reference) or predicted (the sidecar's predictors: the fast path)",
    )
    gen.add_argument(
        "--gpu-memory",
        metavar="SIZE",
        help="memory budget of the fast device for hot/cold neuron placement: 4GiB, 512MB, 0 (= CPU only)",
    )
    gen.set_defaults(run=_run_generate)

    rnd = sub.add_parser("random-checkpoint", help="write a tiny random Llama-format checkpoint (for demos)")
    rnd.add_argument("path", type=Path, help="directory to write (created if needed)")
    rnd.add_argument("--hidden", type=_positive_int, default=64)
    rnd.add_argument("--layers", type=_positive_int, default=2)
    rnd.add_argument("--heads", type=_positive_int, default=4)
    rnd.add_argument("--kv-heads", type=_positive_int, default=2)
    rnd.add_argument("--intermediate", type=_positive_int, default=256)
    rnd.add_argument("--vocab", type=_positive_int, default=512)
    rnd.add_argument("--activation", choices=SUPPORTED_ACTIVATIONS, default="relu2")
    rnd.add_argument("--gated", action="store_true", help="gated FFN (gate_proj and up_proj)")
    rnd.add_argument("--tie", action="store_true", help="tie lm_head to the embeddings")
    rnd.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    rnd.add_argument("--seed", type=int, default=0)
    rnd.add_argument("--max-position-embeddings", type=_positive_int, default=2048)
    rnd.set_defaults(run=_run_random_checkpoint)

    from sparseinfer.sparsity.commands import register as register_sparsity_commands

    register_sparsity_commands(sub)
    from sparseinfer.bench import register as register_bench_commands

    register_bench_commands(sub)
    from sparseinfer.serving.command import register as register_serve_command

    register_serve_command(sub)
    from sparseinfer.training.commands import register as register_training_commands

    register_training_commands(sub)
    return parser


def generate_config(args: argparse.Namespace, env: Environment) -> GenerateConfig:
    model = args.model or env.model
    if not model:
        from sparseinfer.model.bundled import bundled_model_path

        try:
            model = bundled_model_path()  # the shipped ReLU² model
        except FileNotFoundError as e:
            raise UsageError(str(e)) from None
    params = SamplingParams(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        repetition_penalty=args.repetition_penalty,
        seed=args.seed,
        stop=tuple(args.stop),
        ignore_eos=args.ignore_eos,
    )
    try:
        params.validate()
    except ValueError as e:
        raise UsageError(f"invalid sampling parameter: {e}") from None
    dtype = DTYPES[args.dtype] if args.dtype else None
    from sparseinfer.engine.modes import SparsityConfig
    from sparseinfer.engine.placement import parse_memory

    try:
        gpu_memory = parse_memory(args.gpu_memory) if args.gpu_memory is not None else None
        engine = env.engine_config(
            dtype=dtype,
            threads=args.threads,
            weights=args.weights,
            sparsity=SparsityConfig(mode=args.sparsity, gpu_memory=gpu_memory),
        )
        engine.validate()
    except ValueError as e:
        raise UsageError(str(e)) from None
    return GenerateConfig(Path(model), args.prompt, params, engine)


def run_generate(config: GenerateConfig, out: TextIO, err: TextIO) -> None:
    """Stream one completion to ``out`` and a one-line summary to ``err``."""
    from sparseinfer.engine.factory import load_engine
    from sparseinfer.model import load_tokenizer

    if not config.model.is_dir():
        raise UsageError(f"--model {config.model}: not a directory")
    tokenizer = load_tokenizer(config.model)
    prompt_ids = tokenizer.encode(config.prompt)
    # Size the cache for this one request instead of the model's whole context (GBs for a 7B model);
    # the engine still rejects a request that exceeds the context length.
    max_seq = len(prompt_ids) + config.params.max_new_tokens
    generator = load_engine(config.model, dataclasses.replace(config.engine, max_seq=max_seq), tokenizer)
    if generator.sparsity is not None and generator.sparsity.placement is not None:
        err.write(generator.sparsity.placement.summary() + "\n")
    seq = generator.start(prompt_ids, config.params)
    final = None
    for event in generator.stream(seq):
        out.write(event.text)
        out.flush()
        final = event
    if out.isatty():
        out.write("\n")
    assert final is not None and final.stats is not None
    s = final.stats
    r = seq.sparsity.report()
    err.write(
        f"prompt tokens: {s.prompt_tokens}, generated tokens: {s.completion_tokens} ({final.finish_reason}), "
        f"TTFT: {s.ttft_s * 1000:.1f} ms, decode: {s.decode_tokens_per_s:.1f} tokens/s, "
        f"sparsity: {r.mode} (computed {r.computed_share:.1%} of the FFN neurons, "
        f"hot {r.hot_share:.1%} / cold {r.cold_share:.1%})\n"
    )


def _run_generate(args: argparse.Namespace, env: Environment) -> None:
    run_generate(generate_config(args, env), sys.stdout, sys.stderr)


def _run_random_checkpoint(args: argparse.Namespace, env: Environment) -> None:
    from sparseinfer.model.random_checkpoint import write_random_checkpoint

    config = RandomCheckpointConfig(
        path=args.path,
        hidden=args.hidden,
        layers=args.layers,
        heads=args.heads,
        kv_heads=args.kv_heads,
        intermediate=args.intermediate,
        vocab=args.vocab,
        activation=args.activation,
        gated=args.gated,
        tie=args.tie,
        dtype=DTYPES[args.dtype],
        seed=args.seed,
        max_position_embeddings=args.max_position_embeddings,
    )
    if config.hidden % config.heads or config.heads % config.kv_heads:
        raise UsageError("--hidden must be a multiple of --heads, and --heads a multiple of --kv-heads")
    path = write_random_checkpoint(
        config.path,
        hidden=config.hidden,
        layers=config.layers,
        heads=config.heads,
        kv_heads=config.kv_heads,
        intermediate=config.intermediate,
        vocab=config.vocab,
        activation=config.activation,
        gated=config.gated,
        dtype=config.dtype,
        seed=config.seed,
        tie=config.tie,
        max_position_embeddings=config.max_position_embeddings,
    )
    print(f"wrote a random checkpoint to {path}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``sparseinfer`` console script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)  # exits 2 with a usage message on bad flags
    try:
        env = read_environment()
        args.run(args, env)
    except UsageError as e:
        return _fail(args.command, str(e))
    except BrokenPipeError:
        # The reader went away (`... | head`): not our error. Point stdout at /dev/null so the interpreter's
        # final flush does not raise again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except (ValueError, OSError) as e:  # CheckpointError is a ValueError
        return _fail(args.command, str(e) or type(e).__name__)
    except KeyboardInterrupt:
        return 130
    return 0


def _fail(command: str, message: str) -> int:
    print(f"sparseinfer {command}: error: {message}", file=sys.stderr)
    return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
