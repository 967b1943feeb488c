"""Dense decode speed at batch 1: our Engine vs Hugging Face ``generate``; same model, threads and run.

Run: ``pytest benchmarks/test_dense_decode.py`` (not part of the plain ``pytest``, whose testpaths is tests/).
Threads: $SPARSEINFER_BENCH_THREADS, default all cores. Rounds: $SPARSEINFER_BENCH_ROUNDS, default 5.

Model: a random ``LlamaForCausalLM`` (hidden 1024, 8 layers, intermediate 2816, 16 heads, vocab 32000)
written with ``save_pretrained`` and loaded by both sides, in float32 and bfloat16. Each side greedily
generates from the same 32-token prompt, once with 64 new tokens and once with 1 (EOS ignored:
``ignore_eos`` / ``min_new_tokens``). Reported per case: the median wall time of each, end-to-end tokens/s
(64 / t64) and decode-only tokens/s, ``63 / (t64 - t1)``: both runs do the same prefill and first token,
so the difference is 63 decode steps. Results go to benchmarks/results/dense_decode.{json,md}. There are
no speed assertions here.
"""

from __future__ import annotations

import datetime
import json
import os
import statistics
import time
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from sparseinfer.bench.machine import cpu_model  # noqa: E402
from sparseinfer.engine import Engine, SamplingParams  # noqa: E402
from sparseinfer.model import load_model, load_tokenizer  # noqa: E402
from sparseinfer.model.random_checkpoint import build_tokenizer  # noqa: E402

PROMPT_TOKENS, NEW_TOKENS = 32, 64
MODEL_CONFIG = dict(
    vocab_size=32000,
    hidden_size=1024,
    intermediate_size=2816,
    num_hidden_layers=8,
    num_attention_heads=16,
    num_key_value_heads=16,
    max_position_embeddings=2048,
    bos_token_id=0,
    eos_token_id=1,
)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
RESULTS_DIR = Path(__file__).parent / "results"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("dense_llama")
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**MODEL_CONFIG))
    model.save_pretrained(path)
    build_tokenizer(MODEL_CONFIG["vocab_size"]).save(str(path / "tokenizer.json"))
    return path


@pytest.fixture(scope="module")
def prompt() -> list[int]:
    g = torch.Generator().manual_seed(1)
    return [0, *torch.randint(2, MODEL_CONFIG["vocab_size"], (PROMPT_TOKENS - 1,), generator=g).tolist()]


@pytest.fixture(scope="module")
def results():
    """Collects every case's medians; writes the JSON and markdown once the module's benchmarks are done."""
    rows: dict[tuple[str, str], dict[str, float]] = {}
    yield rows
    if rows:
        _write(rows)


def _ours(checkpoint: Path, dtype: torch.dtype, prompt: list[int]):
    model, tok = load_model(checkpoint, dtype=dtype), load_tokenizer(checkpoint)
    gen = Engine(model, tok, max_batch=1, max_seq=PROMPT_TOKENS + NEW_TOKENS)

    def run(n: int) -> tuple[int, ...]:
        params = SamplingParams(temperature=0.0, max_new_tokens=n, ignore_eos=True)
        return gen.generate(prompt, params).token_ids

    return run


def _hf(checkpoint: Path, dtype: torch.dtype, prompt: list[int]):
    model = transformers.AutoModelForCausalLM.from_pretrained(checkpoint, dtype=dtype).eval()
    ids = torch.tensor([prompt])
    mask = torch.ones_like(ids)

    def run(n: int) -> tuple[int, ...]:
        with torch.inference_mode():
            out = model.generate(
                ids, attention_mask=mask, do_sample=False, max_new_tokens=n, min_new_tokens=n, pad_token_id=1
            )
        return tuple(out[0, len(prompt) :].tolist())

    return run


def _settings() -> tuple[int, int]:
    """(threads, rounds) from the environment; read here, at run time, never at import."""
    threads = int(os.environ.get("SPARSEINFER_BENCH_THREADS") or os.cpu_count() or 1)
    rounds = int(os.environ.get("SPARSEINFER_BENCH_ROUNDS") or 5)
    return threads, rounds


@pytest.mark.parametrize("dtype_name", list(DTYPES))
def test_dense_decode(benchmark, checkpoint, prompt, results, dtype_name):
    threads, rounds = _settings()
    torch.set_num_threads(threads)
    runs = {"sparseinfer": _ours, "transformers": _hf}
    runs = {impl: make(checkpoint, DTYPES[dtype_name], prompt) for impl, make in runs.items()}
    first_tokens = {impl: run(NEW_TOKENS) for impl, run in runs.items()}  # also the warm-up
    assert all(len(t) == NEW_TOKENS for t in first_tokens.values())

    # Both implementations run in every round, in alternating order, so that a noisy neighbour slows
    # both alike instead of whichever happened to be measured second.
    times: dict[tuple[str, int], list[float]] = {(i, n): [] for i in runs for n in (1, NEW_TOKENS)}

    def one_round() -> None:
        order = list(runs) if len(times[("sparseinfer", 1)]) % 2 == 0 else list(reversed(runs))
        for impl in order:
            for n in (1, NEW_TOKENS):
                start = time.perf_counter()
                runs[impl](n)
                times[(impl, n)].append(time.perf_counter() - start)

    benchmark.pedantic(one_round, rounds=rounds, iterations=1, warmup_rounds=0)
    for impl in runs:
        one, full = statistics.median(times[(impl, 1)]), statistics.median(times[(impl, NEW_TOKENS)])
        results[(dtype_name, impl)] = {
            "t_1_token_s": one,
            "t_64_tokens_s": full,
            "end_to_end_tokens_per_s": NEW_TOKENS / full,
            "decode_tokens_per_s": (NEW_TOKENS - 1) / (full - one) if full > one else float("nan"),
            "rounds": rounds,
            "threads": threads,
            "same_greedy_tokens_as_transformers": first_tokens[impl] == first_tokens["transformers"],
        }
        benchmark.extra_info[impl] = results[(dtype_name, impl)]


def _write(rows: dict[tuple[str, str], dict[str, float]]) -> None:
    meta = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "cpu": cpu_model(),
        "threads": torch.get_num_threads(),
        "rounds": _settings()[1],
        "model": MODEL_CONFIG,
        "prompt_tokens": PROMPT_TOKENS,
        "new_tokens": NEW_TOKENS,
        "method": "median of rounds; decode tokens/s = 63 / (t(64 new tokens) - t(1 new token))",
    }
    cases = [{"dtype": d, "impl": i, **v} for (d, i), v in sorted(rows.items())]
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    (RESULTS_DIR / "dense_decode.json").write_text(
        json.dumps({"meta": meta, "cases": cases}, indent=2) + "\n"
    )

    lines = [
        "# Dense decode, batch 1",
        "",
        f"{meta['date']} · torch {meta['torch']} · transformers {meta['transformers']} · {meta['cpu']} · "
        f"{meta['threads']} threads",
        "",
        f"Random Llama (hidden 1024, 8 layers, intermediate 2816, 16 heads, vocab 32000), greedy, "
        f"{PROMPT_TOKENS}-token prompt. Medians over {meta['rounds']} rounds, both implementations "
        f"in every round in alternating order. t1 = prompt + 1 new token, "
        f"t64 = prompt + 64 new tokens (EOS ignored); end-to-end = 64 / t64; "
        f"decode = 63 / (t64 − t1), i.e. prefill and first token excluded.",
        "",
        "| dtype | implementation | t1 (ms) | t64 (ms) | end-to-end tok/s | decode tok/s | decode vs HF "
        "| same greedy tokens |",
        "|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for case in cases:
        hf = rows.get((case["dtype"], "transformers"), {}).get("decode_tokens_per_s")
        ratio = f"{case['decode_tokens_per_s'] / hf:.2f}×" if hf else "–"
        lines.append(
            f"| {case['dtype']} | {case['impl']} | {case['t_1_token_s'] * 1e3:.1f} | "
            f"{case['t_64_tokens_s'] * 1e3:.1f} | {case['end_to_end_tokens_per_s']:.1f} | "
            f"{case['decode_tokens_per_s']:.1f} | {ratio} | "
            f"{'yes' if case['same_greedy_tokens_as_transformers'] else 'no'} |"
        )
    table = "\n".join(lines) + "\n"
    (RESULTS_DIR / "dense_decode.md").write_text(table)
    print("\n" + table)
