"""``sparseinfer bench bundled``: the shipped ReLU² model in each sparsity mode and weight format: decode
tok/s, perplexity, and the predictor's recall.

Model: ``model.bundled.bundled_model_path()`` (or ``--model DIR``), loaded once with the engine's
``SparseRuntime`` installed from its sidecar, so every mode runs through the same executors the server uses
(dense mode included: the executors' dense path).

Decode: one ``Engine`` decodes the same prompt (the first ``--prompt-tokens`` tokens of the text) greedily
in every mode (``start(..., sparsity_mode=)``), the modes interleaved within each round and their order
reversed every other round (the machine is shared: a noisy neighbour then slows all modes alike); tokens/s is
the sequence's decode rate (tokens after the first / time after the first token), the figure is the median
over rounds; round 0 warms up and is not counted. The computed share is the decode steps' (prefill excluded).

Perplexity: ``sparsity.perplexity.perplexity`` on ``--text`` (the training corpus's validation split is not
shipped, so the held-out text is an argument) cut into windows of ``--seq-len`` tokens, with the runtime's
step context set around each forward so every row runs the mode under test and its counts are tallied (the
computed share over the scored text). In predicted mode the perplexity pass also measures the true active
sets (``measure_truth``), so the table gives the predictor's recall (mean over layers) in each format.

Weight formats: ``--weights checkpoint q8_0 q4_0`` loads one engine per format (quantized at load, as
``serve --weights`` does) and measures every mode in each, one format after another.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TextIO

import torch

from sparseinfer.bench.machine import cpu_model
from sparseinfer.engine.accounting import SparsityReport, SparsityTally
from sparseinfer.engine.modes import SparseRuntime, validate_mode
from sparseinfer.model.quant import validate_weights
from sparseinfer.model.step import MODES, SparsityMode
from sparseinfer.model.transformer import Transformer


@dataclass(frozen=True)
class BundledBenchConfig:
    text: Path  # held-out text for the perplexity (and the decode prompt)
    model: Path | None = None  # None: the bundled ReLU² model
    tokens: int = 8192  # perplexity tokens (the training log's validation figure used 8192)
    seq_len: int = 128  # the bundled model's context length
    batch_size: int = 8
    prompt_tokens: int = 16
    new_tokens: int = 64
    rounds: int = 5
    threads: int | None = None
    modes: tuple[str, ...] = MODES
    weights: tuple[str, ...] = ("checkpoint",)  # engine weight formats (EngineConfig.weights)

    def validate(self) -> None:
        for name in ("tokens", "batch_size", "prompt_tokens", "new_tokens", "rounds"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be ≥ 1, got {getattr(self, name)}")
        if self.seq_len < 2:
            raise ValueError(f"--seq-len must be ≥ 2 (perplexity needs a next token), got {self.seq_len}")
        if self.new_tokens < 2:
            raise ValueError("--new-tokens must be ≥ 2 (the decode rate needs tokens after the first)")
        if not self.modes:
            raise ValueError("--modes must name at least one mode")
        for mode in self.modes:
            validate_mode(mode, "--modes")
        if not self.weights:
            raise ValueError("--weights must name at least one format")
        for fmt in self.weights:
            validate_weights(fmt)


def _tally(runtime: SparseRuntime, mode: str) -> SparsityTally:
    return SparsityTally(mode, runtime.layer_neurons, runtime.neuron_bytes)


@contextmanager
def mode_forwards(model: Transformer, runtime: SparseRuntime, mode: str) -> Iterator[SparsityTally]:
    """Inside the block every plain ``model(tokens)`` call runs all its rows in ``mode``, and the yielded
    tally counts them (the same ``ForwardStep`` the engine passes at its steps, committed the same way)."""
    tally = _tally(runtime, mode)
    runtime.check_mode(mode)

    def with_step(module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        tokens = args[0] if args else kwargs["tokens"]  # (B, T)
        return args, {**kwargs, "step": runtime.step([mode] * tokens.shape[0])}

    def commit(module: torch.nn.Module, args: tuple, kwargs: dict, output: torch.Tensor) -> None:
        tokens = args[0] if args else kwargs["tokens"]
        B, T = tokens.shape
        kwargs["step"].commit([tally] * B, T)  # one tally for all rows: it sums them

    handles = [
        model.register_forward_pre_hook(with_step, with_kwargs=True),
        model.register_forward_hook(commit, with_kwargs=True),
    ]
    try:
        yield tally
    finally:
        for h in handles:
            h.remove()


def mode_perplexity(
    model: Transformer,
    runtime: SparseRuntime,
    sequences: torch.Tensor,
    mode: str,
    batch_size: int,
    measure_truth: bool = False,
) -> tuple[float, SparsityReport]:
    """``perplexity`` of ``sequences`` (N, T) with every FFN running ``mode``; and what it computed
    (with each layer's recall when ``measure_truth``: the true active sets are computed beside)."""
    from sparseinfer.sparsity.perplexity import perplexity

    before = runtime.measure_truth
    runtime.measure_truth = measure_truth
    try:
        with torch.inference_mode(), mode_forwards(model, runtime, mode) as tally:
            ppl = perplexity(model, sequences, batch_size=batch_size, progress=False, desc=mode)
    finally:
        runtime.measure_truth = before
    return ppl, tally.report()


def mean_recall(report: SparsityReport) -> float | None:
    """The mean over layers of the measured recall; None when nothing was measured."""
    recalls = [layer.recall for layer in report.layers if layer.recall is not None]
    return statistics.fmean(recalls) if recalls else None


def measure_decode(
    generator: Any, prompt: list[int], modes: tuple[str, ...], new_tokens: int, rounds: int, out: TextIO
) -> dict[str, Any]:
    """Per mode: decode tokens/s of every counted round and the decode steps' computed share."""
    from sparseinfer.engine.sampling import SamplingParams

    params = SamplingParams(temperature=0.0, max_new_tokens=new_tokens, ignore_eos=True)
    rates: dict[str, list[float]] = {mode: [] for mode in modes}
    shares: dict[str, float] = {}
    for rnd in range(rounds + 1):  # round 0 warms up (allocator, caches) and is not counted
        order = list(modes) if rnd % 2 == 0 else list(reversed(modes))
        for mode in order:
            seq = generator.start(prompt, params, sparsity_mode=mode)
            r0 = None
            for _ in generator.stream(seq):
                r0 = r0 or seq.sparsity.report()  # after the prefill: subtracted below
            r1 = seq.sparsity.report()
            if rnd > 0:
                rates[mode].append(seq.stats().decode_tokens_per_s)
            shares[mode] = (r1.computed_share * r1.tokens - r0.computed_share * r0.tokens) / (
                r1.tokens - r0.tokens
            )
        if rnd > 0:
            out.write(f"round {rnd}: " + ", ".join(f"{m} {rates[m][-1]:.1f} tok/s" for m in modes) + "\n")
    return {"rates": rates, "computed_share": shares}


def run_bundled_bench(config: BundledBenchConfig, out: TextIO) -> dict[str, Any]:
    """Measure; return the JSON-able result (meta + one row per mode)."""
    from sparseinfer.engine.factory import EngineConfig, load_engine
    from sparseinfer.model import load_tokenizer
    from sparseinfer.model.bundled import bundled_model_path
    from sparseinfer.sparsity.data import load_text_tokens, text_sha256

    config.validate()
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    path = config.model if config.model is not None else bundled_model_path()
    tok = load_tokenizer(path)
    seqs = load_text_tokens(tok, config.text, config.tokens, config.seq_len, min_tokens=config.seq_len)
    prompt = seqs.flatten()[: config.prompt_tokens].tolist()
    max_seq = config.prompt_tokens + config.new_tokens
    rows = []
    for fmt in config.weights:
        engine = load_engine(path, EngineConfig(max_seq=max_seq, per_request_modes=True, weights=fmt), tok)
        model, runtime = engine.model, engine.sparsity
        if max_seq > model.config.max_position_embeddings:
            raise ValueError(
                f"--prompt-tokens + --new-tokens = {max_seq} exceeds the model's context "
                f"{model.config.max_position_embeddings}"
            )
        if runtime is None:
            raise ValueError(f"{path}: no sparsity sidecar; `bench bundled` compares the sparse modes")
        for mode in config.modes:
            runtime.check_mode(mode)  # a missing sidecar section fails before anything is measured
        out.write(
            f"{fmt}: decode of a {len(prompt)}-token prompt, {config.new_tokens} new tokens, "
            f"{config.rounds} rounds\n"
        )
        decode = measure_decode(engine, prompt, config.modes, config.new_tokens, config.rounds, out)
        for mode in config.modes:
            predicted = mode == SparsityMode.PREDICTED
            ppl, report = mode_perplexity(model, runtime, seqs, mode, config.batch_size, predicted)
            out.write(f"{fmt}: perplexity ({mode}) {ppl:.3f}\n")
            rows.append(
                {
                    "weights": fmt,
                    "mode": mode,
                    "decode_tokens_per_s": statistics.median(decode["rates"][mode]),
                    "all_rounds": decode["rates"][mode],
                    "decode_computed_share": decode["computed_share"][mode],
                    "perplexity": ppl,
                    "perplexity_computed_share": report.computed_share,
                    "perplexity_tokens": report.tokens,
                    "recall": mean_recall(report) if predicted else None,
                }
            )
        dtype = str(model.dtype).removeprefix("torch.")
        del engine, model, runtime
    meta = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "cpu": cpu_model(),
        "threads": torch.get_num_threads(),
        "model": str(path),
        "dtype": dtype,  # of the activations and unquantized weights; the format is per row
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(config).items()},
        "perplexity_sequences": list(seqs.shape),
        "text_sha256": text_sha256(config.text),
    }
    return {"meta": meta, "rows": rows}


def format_table(result: dict[str, Any]) -> str:
    meta, rows = result["meta"], result["rows"]
    c = meta["config"]
    n, t = meta["perplexity_sequences"]
    lines = [
        "# Bundled ReLU² model: decode tokens/s and perplexity per sparsity mode and weight format",
        "",
        f"{meta['date']} · torch {meta['torch']} · {meta['cpu']} · {meta['threads']} threads · "
        f"{meta['dtype']} · {meta['model']}",
        "",
        f"Decode: batch 1, {c['prompt_tokens']}-token prompt, {c['new_tokens']} new tokens, greedy, "
        f"median over {c['rounds']} interleaved rounds. Perplexity: {n} windows × {t} tokens of "
        f"{c['text']} (sha256 {meta['text_sha256'][:12]}…), run with the engine's sparse executors in "
        "the given mode. Computed share: FFN neurons computed / a dense FFN's (decode steps; the "
        "perplexity pass). Recall (predicted mode): truly active neurons the predictor selected / truly "
        "active neurons, mean over layers, over the perplexity pass. Weights: `checkpoint` is the "
        "checkpoint's own dtype; q8_0 / q4_0 are quantized at load (`--weights`).",
        "",
        "| weights | mode | decode tok/s | perplexity | computed share (decode) | "
        "computed share (perplexity) | predictor recall |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        recall = row.get("recall")
        lines.append(
            f"| {row.get('weights', 'checkpoint')} | {row['mode']} | {row['decode_tokens_per_s']:.1f} | "
            f"{row['perplexity']:.3f} | {row['decode_computed_share']:.1%} | "
            f"{row['perplexity_computed_share']:.1%} | {'—' if recall is None else f'{recall:.1%}'} |"
        )
    return "\n".join(lines) + "\n"


def write_results(result: dict[str, Any], directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "bundled.json").write_text(json.dumps(result, indent=2) + "\n")
    (directory / "bundled.md").write_text(format_table(result))


def register(bench_sub: argparse._SubParsersAction) -> None:
    p = bench_sub.add_parser(
        "bundled", help="the bundled ReLU² model: decode tokens/s and perplexity in each sparsity mode"
    )
    d = BundledBenchConfig(text=Path())
    p.add_argument("--text", type=Path, required=True, help="held-out UTF-8 text for the perplexity")
    p.add_argument("--model", type=Path, default=None, help="checkpoint dir (default: the bundled model)")
    p.add_argument("--tokens", type=int, default=d.tokens, help="perplexity tokens")
    p.add_argument("--seq-len", type=int, default=d.seq_len)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--prompt-tokens", type=int, default=d.prompt_tokens)
    p.add_argument("--new-tokens", type=int, default=d.new_tokens)
    p.add_argument("--rounds", type=int, default=d.rounds)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--modes", nargs="+", default=list(d.modes), metavar="MODE", help=" | ".join(MODES))
    p.add_argument(
        "--weights",
        nargs="+",
        default=list(d.weights),
        metavar="FORMAT",
        help="weight formats, one engine each (checkpoint | q8_0 | q4_0; default: %(default)s)",
    )
    p.add_argument("--results", type=Path, default=None, help="write bundled.json and bundled.md into DIR")
    p.set_defaults(run=_run)


def _run(args: argparse.Namespace, env: object) -> None:
    config = BundledBenchConfig(
        text=args.text,
        model=args.model,
        tokens=args.tokens,
        seq_len=args.seq_len,
        batch_size=args.batch_size,
        prompt_tokens=args.prompt_tokens,
        new_tokens=args.new_tokens,
        rounds=args.rounds,
        threads=args.threads,
        modes=tuple(args.modes),
        weights=tuple(args.weights),
    )
    result = run_bundled_bench(config, sys.stderr)
    sys.stdout.write(format_table(result) + "\n" + json.dumps(result, indent=2) + "\n")
    if args.results is not None:
        write_results(result, args.results)
