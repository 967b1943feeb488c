"""``sparseinfer bench llamacpp``: our decode against llama.cpp's, on the same weights, side by side.

The model is ``bench decode``'s LLaMA-7B-shaped checkpoint (``--layers`` layers, gated FATReLU, 90% of FFN
neurons inactive, an exact low-rank predictor), converted to GGUF by llama.cpp's own converter
(``gguf_convert``) and quantized by llama-quantize; llama.cpp runs it with llama-bench (its activation is
SiLU there, FATReLU here: for decode speed that changes nothing, every weight is read either way). Per
format (bf16, q8_0, q4_0), ours runs dense and predicted in one engine (per-request modes), built once
with ``--weights`` that format.

Every round measures, in alternating order: the machine's read bandwidth (read_bytes over 1 GiB in huge
pages), then per format llama-bench's tg (batch-1 decode of ``--new-tokens``) and pp (``--prompt-tokens``
of prefill), and ours in each mode the same two. Then, once: our decode at batch 4 and 16 per mode, each
batch-1 projection's bandwidth, and each engine's resident memory against its weight bytes. Results:
``llamacpp.json`` + ``llamacpp.md`` (``llamacpp_report``); never part of the plain test command.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import statistics
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TextIO

import torch

from sparseinfer.bench import engine_measure as em
from sparseinfer.bench.decode_model import SHAPE, write_checkpoint
from sparseinfer.bench.llamacpp_tools import LlamaBenchCrashed, default_cache, locate
from sparseinfer.bench.machine import cpu_flags, cpu_model

FORMATS = ("bf16", "q8_0", "q4_0")
OURS = {"bf16": "checkpoint", "q8_0": "q8_0", "q4_0": "q4_0"}  # --weights of each format
LLAMA = {"q8_0": "Q8_0", "q4_0": "Q4_0"}  # llama-quantize's names


@dataclass(frozen=True)
class LlamaCppBenchConfig:
    layers: int = 4
    formats: tuple[str, ...] = FORMATS
    rounds: int = 5
    new_tokens: int = 32
    prompt_tokens: int = 128
    threads: int = 2
    batches: tuple[int, ...] = (4, 16)
    checkpoint: Path | None = None
    llama_cpp: Path | None = None
    cache: Path | None = None
    sparsity: float = 0.9
    rank: int = 256
    seed: int = 0
    decode_prompt_tokens: int = 8  # the batch-1 decode's prompt (llama-bench's tg has none)

    def validate(self) -> None:
        unknown = [f for f in self.formats if f not in FORMATS]
        if unknown or not self.formats:
            raise ValueError(f"--formats must name some of {', '.join(FORMATS)}, got {list(self.formats)}")
        for name in ("layers", "rounds", "new_tokens", "prompt_tokens", "threads"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be ≥ 1, got {getattr(self, name)}")

    @property
    def path(self) -> Path:
        if self.checkpoint is not None:
            return self.checkpoint
        return Path(
            f"/tmp/sparseinfer-bench-decode-l{self.layers}-s{self.sparsity:g}-r{self.rank}-{self.seed}"
        )


def silu_twin(path: Path) -> Path:
    """A checkpoint beside ``path`` with the same weights (linked) and SiLU for FATReLU, no sidecar: our dense
    decode with no exact zeros to skip, every FFN row read, which is what llama.cpp computes (its converter
    maps the model to SiLU). ``path``'s own dense mode skips the up and down rows of zero gates."""
    twin = path.with_name(path.name + "-silu")
    twin.mkdir(exist_ok=True)
    config = json.loads((path / "config.json").read_text())
    config["hidden_act"] = "silu"
    config.pop("hidden_act_param", None)  # FATReLU's threshold
    (twin / "config.json").write_text(json.dumps(config, indent=2))
    for f in path.iterdir():
        if f.name in (
            "model.safetensors",
            "tokenizer.json",
            "tokenizer_config.json",
            "special_tokens_map.json",
        ):
            link = twin / f.name
            if not link.exists():
                link.symlink_to(f.resolve())
    return twin


def _prompt(n: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return [0, *torch.randint(2, SHAPE["vocab"], (n - 1,), generator=g).tolist()]


def run_llamacpp_bench(config: LlamaCppBenchConfig, out: TextIO) -> dict[str, Any]:
    """Measure; return the JSON-able result."""
    from sparseinfer.cli import read_environment
    from sparseinfer.engine import ffn_calibration
    from sparseinfer.engine.factory import EngineConfig, load_engine, return_freed_heap
    from sparseinfer.engine.hugepages import to_hugepages
    from sparseinfer.engine.modes import SparsityConfig
    from sparseinfer.model.linear_calibration import calibration

    config.validate()
    dense_linear = read_environment().dense_linear  # $SPARSEINFER_DENSE_LINEAR, as the other commands
    torch.set_num_threads(config.threads)
    tools = locate(config.llama_cpp, config.cache or default_cache(), out)
    path = write_checkpoint(config, out)
    gguf = {"bf16": tools.convert(path, path / "model-bf16.gguf", out)}
    for fmt in config.formats:
        if fmt in LLAMA:
            gguf[fmt] = tools.quantize(gguf["bf16"], path / f"model-{LLAMA[fmt]}.gguf", LLAMA[fmt], out)
    silu = silu_twin(path)
    engines, silu_engines, memory = {}, {}, {}
    for fmt in config.formats:  # one at a time, so each one's resident memory is its own
        gc.collect()  # what writing the checkpoint (or the engine before) freed must not be reused by
        return_freed_heap()  # this load unseen: the growth would then read below the weights
        before = em.resident_bytes()
        engine_config = EngineConfig(
            max_seq=config.prompt_tokens + config.new_tokens + 8,
            max_batch=max(config.batches, default=1),
            sparsity=SparsityConfig(mode="dense"),
            per_request_modes=True,
            weights=OURS[fmt],
            dense_linear=dense_linear,
        )
        engines[fmt] = load_engine(path, engine_config)
        parts = em.weight_bytes(engines[fmt])
        memory[fmt] = {
            "resident_bytes": em.resident_bytes() - before,
            "weight_bytes": parts,
            "kv_cache_bytes": engines[fmt].cache.nbytes(),
        }
        out.write(f"loaded ours, {fmt}: {sum(parts.values()) / 2**30:.2f} GiB of weights\n")
        silu_config = EngineConfig(
            max_seq=engine_config.max_seq, weights=OURS[fmt], dense_linear=dense_linear
        )
        silu_engines[fmt] = load_engine(silu, silu_config)
    buf = to_hugepages(torch.ones(1 << 28))  # 1 GiB
    decode_prompt = _prompt(config.decode_prompt_tokens, config.seed + 1)
    prefill_prompt = _prompt(config.prompt_tokens, config.seed + 2)
    rec: dict[str, list[float]] = {}

    def add(key: str, value: float) -> None:
        rec.setdefault(key, []).append(value)

    reports: dict[str, Any] = {}
    no_repack: set[str] = set()  # llama-bench runs that crash with weight repacking: measured without it
    for rnd in range(config.rounds + 1):  # round 0 warms up (page cache, allocator) and is not kept
        keep = rnd > 0
        order = list(config.formats) if rnd % 2 == 0 else list(reversed(config.formats))
        bandwidth = em.read_bandwidth(buf)
        for fmt in order:
            tg = _llama_bench(tools, gguf[fmt], config.threads, 0, config.new_tokens, no_repack, out)
            pp = _llama_bench(tools, gguf[fmt], config.threads, config.prompt_tokens, 0, no_repack, out)
            modes = em.modes_of(engines[fmt])
            for mode in modes if rnd % 2 == 0 else reversed(modes):
                rate, report = em.decode_rate(engines[fmt], decode_prompt, mode, config.new_tokens)
                prefill = em.prefill_rate(engines[fmt], prefill_prompt, mode)
                if keep:
                    add(f"ours/{fmt}/{mode}/decode", rate)
                    add(f"ours/{fmt}/{mode}/prefill", prefill)
                    reports[f"{fmt}/{mode}"] = report
            rate, _ = em.decode_rate(silu_engines[fmt], decode_prompt, "dense", config.new_tokens)
            prefill = em.prefill_rate(silu_engines[fmt], prefill_prompt, "dense")
            if keep:
                add(f"ours/{fmt}/dense-silu/decode", rate)
                add(f"ours/{fmt}/dense-silu/prefill", prefill)
                add(f"llama.cpp/{fmt}/decode", tg)
                add(f"llama.cpp/{fmt}/prefill", pp)
        if keep:
            add("bandwidth", bandwidth)
            line = ", ".join(f"{k} {v[-1]:.1f}" for k, v in rec.items() if k.endswith("decode"))
            out.write(f"round {rnd}: {bandwidth:.1f} GB/s read; {line}\n")
            out.flush()
    extras: dict[str, Any] = {}
    for fmt, engine in engines.items():
        bw = em.read_bandwidth(buf)
        extras[fmt] = {
            "projections_gbps": em.projection_bandwidth(engine),
            "read_gbps": bw,
            "batches": {
                str(B): {
                    mode: em.batch_rate(
                        engine, [_prompt(8, 10 + i) for i in range(B)], mode, config.new_tokens
                    )
                    for mode in em.modes_of(engine)
                }
                for B in config.batches
            },
        }
    meta = _meta(config, tools, path)
    meta["dense_linear"] = dense_linear
    meta["dense_linear_rows_up_to"] = calibration().chosen()  # what "auto" measured, these shapes and more
    meta["ffn_crossover"] = ffn_calibration.calibration().entries()  # the batched FFN's measured costs
    meta["llama_cpp_without_repack"] = sorted(no_repack)
    return {
        "meta": meta,
        "rounds": rec,
        "reports": {k: asdict(v) for k, v in reports.items()},
        "memory": memory,
        "extras": extras,
    }


def _llama_bench(
    tools: Any, gguf: Path, threads: int, prompt: int, generate: int, no_repack: set[str], out: TextIO
) -> float:
    """llama-bench's tokens/s. On some Sapphire Rapids machines llama.cpp's AMX / repacked quantized matmul
    segfaults in prefill (seen with llama-cpp-python 0.3.36's llama.cpp; ggml-org/llama.cpp#20824): such a
    run is measured again with ``--repack 0`` (the weights as the GGUF holds them), and so is every later
    run of the same file and test, which the report then says."""
    key = f"{gguf.name} {'pp' if prompt else 'tg'}"
    if key not in no_repack:
        try:
            return float(tools.bench(gguf, threads, prompt, generate)["avg_ts"])
        except LlamaBenchCrashed as crash:
            out.write(f"{crash}; measuring {key} with --repack 0 from now on\n")
            no_repack.add(key)
    return float(tools.bench(gguf, threads, prompt, generate, repack=False)["avg_ts"])


def _meta(config: LlamaCppBenchConfig, tools: Any, path: Path) -> dict[str, Any]:
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "cpu": cpu_model(),
        "cpu_flags": cpu_flags(),
        "threads": config.threads,
        "llama_cpp": {"version": tools.version, "bin": str(tools.bin)},
        "checkpoint": str(path),
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(config).items()},
    }


def summary(result: dict[str, Any]) -> dict[str, float]:
    """Medians of every measured series."""
    return {k: statistics.median(v) for k, v in result["rounds"].items()}


def register(bench_sub: argparse._SubParsersAction) -> None:
    p = bench_sub.add_parser(
        "llamacpp", help="our decode and prefill vs llama.cpp's, same weights, side by side"
    )
    d = LlamaCppBenchConfig()
    p.add_argument("--layers", type=int, default=d.layers)
    p.add_argument("--formats", default=",".join(d.formats), help="comma-separated: bf16,q8_0,q4_0")
    p.add_argument("--rounds", type=int, default=d.rounds)
    p.add_argument("--new-tokens", type=int, default=d.new_tokens)
    p.add_argument(
        "--prompt-tokens", type=int, default=d.prompt_tokens, help="prefill length (llama-bench pp)"
    )
    p.add_argument("--threads", type=int, default=d.threads)
    p.add_argument("--batches", default=",".join(map(str, d.batches)), help="decode batch sizes (ours)")
    p.add_argument("--checkpoint", type=Path, default=None, help="where to write/reuse the model")
    p.add_argument("--llama-cpp", type=Path, default=None, help="a built llama.cpp tree (default: build one)")
    p.add_argument("--cache", type=Path, default=None, help="where the llama.cpp build lives")
    p.add_argument("--results", type=Path, default=None, help="write llamacpp.json and llamacpp.md into DIR")
    p.add_argument("--name", default="llamacpp", help="file name stem of --results")
    p.set_defaults(run=_run)


def _run(args: argparse.Namespace, env: object) -> None:
    from sparseinfer.bench.llamacpp_report import format_table

    config = LlamaCppBenchConfig(
        layers=args.layers,
        formats=tuple(f for f in args.formats.split(",") if f),
        rounds=args.rounds,
        new_tokens=args.new_tokens,
        prompt_tokens=args.prompt_tokens,
        threads=args.threads,
        batches=tuple(int(b) for b in args.batches.split(",") if b),
        checkpoint=args.checkpoint,
        llama_cpp=args.llama_cpp,
        cache=args.cache,
    )
    result = run_llamacpp_bench(config, sys.stderr)
    table = format_table(result)
    sys.stdout.write(table)
    if args.results is not None:
        args.results.mkdir(parents=True, exist_ok=True)
        (args.results / f"{args.name}.json").write_text(json.dumps(result, indent=2) + "\n")
        (args.results / f"{args.name}.md").write_text(table)
