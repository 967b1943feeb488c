"""Client round trip and one batched engine step (pytest-benchmark).

Run: ``pytest benchmarks/test_client.py`` (not part of the plain ``pytest``: testpaths is tests/).
Model: the bundled checkpoint when it is installed, else a small random ReLU² checkpoint written to a
temporary directory (the model in use is recorded in each benchmark's extra_info). The server runs
in-process (``start_server`` on port 0), so the round trips include both sides' Python but no network.

- ``test_round_trip_tokenize``: a unary call that does no model work: the client + gRPC + servicer overhead.
- ``test_round_trip_generate_one_token``: Generate with max_new_tokens=1: the above plus the batcher hand-off
  and one prefill.
- ``test_batched_decode_step[B]``: one ``Engine.decode_step`` over B running sequences (the unit the
  server's batcher schedules); per-token cost at B is the time / B.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from sparseinfer_client import Client

PROMPT = "The quick brown fox jumps over the lazy dog."


def _model_dir(tmp_path_factory) -> Path:
    try:
        from sparseinfer.model.bundled import bundled_model_path

        return bundled_model_path()
    except (ImportError, FileNotFoundError):
        from sparseinfer.model.random_checkpoint import write_random_checkpoint

        return write_random_checkpoint(tmp_path_factory.mktemp("bench_client"), hidden=256, layers=4, heads=4,
                                       kv_heads=2, intermediate=1024, vocab=512)  # fmt: skip


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return _model_dir(tmp_path_factory)


@pytest.fixture(scope="module")
def client(model_dir):
    from sparseinfer.serving.config import ServeConfig
    from sparseinfer.serving.server import start_server

    handle = start_server(ServeConfig(model=model_dir, port=0))
    with Client(f"127.0.0.1:{handle.port}", timeout=60) as c:
        c.wait_ready(30)
        yield c
    handle.stop(grace=1.0)


def test_round_trip_tokenize(benchmark, client, model_dir):
    result = benchmark(client.tokenize, PROMPT)
    assert result.ids
    benchmark.extra_info["model"] = str(model_dir)


def test_round_trip_generate_one_token(benchmark, client, model_dir):
    result = benchmark(client.generate, PROMPT, max_new_tokens=1, temperature=0)
    assert result.usage.generated_tokens == 1
    benchmark.extra_info["model"] = str(model_dir)
    benchmark.extra_info["server_ttft_s"] = result.timings.ttft_s


@pytest.mark.parametrize("batch", [1, 16])
def test_batched_decode_step(benchmark, model_dir, batch):
    from sparseinfer.engine.generate import Engine
    from sparseinfer.engine.sampling import SamplingParams
    from sparseinfer.model import load_model, load_tokenizer

    tokenizer = load_tokenizer(model_dir)
    model = load_model(model_dir)
    rounds, warmup = 30, 3
    ids = tokenizer.encode(PROMPT)
    steps = rounds + warmup + 1
    generator = Engine(model, tokenizer, max_batch=batch, max_seq=len(ids) + steps + 1)
    params = SamplingParams(max_new_tokens=steps, temperature=0.0, ignore_eos=True)
    seqs = [generator.start(ids, params) for _ in range(batch)]
    for seq in seqs:
        generator.prefill(seq)
    events = benchmark.pedantic(generator.decode_step, args=(seqs,), rounds=rounds, iterations=1,
                                warmup_rounds=warmup)  # fmt: skip
    assert len(events) == batch
    benchmark.extra_info["model"] = str(model_dir)
    benchmark.extra_info["batch"] = batch
    benchmark.extra_info["per_token_s"] = benchmark.stats.stats.median / batch
