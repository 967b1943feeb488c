"""The client against the real server (``sparseinfer.serving.server.start_server``, in-process on port 0)
serving a tiny random ReLU² checkpoint: every call, results that agree across call styles, the server's
errors arriving as the right exception classes, deadlines, cancellation, auth, TLS, the CLI."""

from __future__ import annotations

import asyncio
import io
import json
import subprocess
from pathlib import Path

import pytest

import sparseinfer_client as sc
from sparseinfer_client import AsyncClient, Client
from sparseinfer_client.cli import main as cli_main

serving = pytest.importorskip("sparseinfer.serving.server", reason="the server package is not installed")
from sparseinfer.serving.config import Limits, ServeConfig  # noqa: E402

FAST_RETRY = sc.RetryPolicy(max_attempts=3, initial_backoff_s=0.01, max_backoff_s=0.05, jitter=0.0)
PROMPT = "The quick brown fox"


@pytest.fixture(scope="module")
def server(tiny_random_checkpoint):
    handle = serving.start_server(
        ServeConfig(model=tiny_random_checkpoint, port=0, limits=Limits(max_batch_size=8, max_new_tokens=64))
    )
    yield handle
    handle.stop(grace=1.0)


@pytest.fixture
def client(server):
    with Client(f"127.0.0.1:{server.port}", timeout=60) as c:
        yield c


def test_unary_stream_and_tokenize_agree(client):
    result = client.generate(PROMPT, max_new_tokens=12, temperature=0, ignore_eos=True, return_tokens=True)
    chunks = list(client.generate_stream(PROMPT, max_new_tokens=12, temperature=0, ignore_eos=True,
                                         return_tokens=True))  # fmt: skip
    assert result.finish_reason == "length" and result.usage.generated_tokens == 12
    assert [t.id for t in result.tokens] == [t.id for c in chunks for t in c.tokens]
    assert "".join(c.text for c in chunks) == result.text
    final = chunks[-1]
    assert final.finished and all(not c.finished for c in chunks[:-1])
    assert final.usage == result.usage
    assert result.usage.prompt_tokens == len(client.tokenize(PROMPT).ids)
    # Token ids as the prompt give the same greedy continuation as the text they came from.
    by_ids = client.generate(
        list(client.tokenize(PROMPT).ids), max_new_tokens=12, temperature=0, ignore_eos=True
    )
    assert by_ids.text == result.text


def test_report_and_timings_are_consistent(client):
    info = client.model_info()
    result = client.generate(PROMPT, max_new_tokens=6, temperature=0, ignore_eos=True)
    report = result.sparsity
    assert report.mode == "dense" and report.computed_share == 1.0
    assert len(report.layers) == info.num_layers == len(info.neurons_per_layer)
    assert all(layer.predicted_active_share == 1.0 for layer in report.layers)
    assert report.ffn_bytes_read == report.ffn_bytes_dense > 0
    assert report.hot_share + report.cold_share == pytest.approx(1.0)
    t = result.timings
    assert 0 <= t.queue_s <= t.ttft_s <= t.total_s and t.per_token_s > 0


def test_seed_replays_a_sampled_result(client):
    first = client.generate(PROMPT, max_new_tokens=10, temperature=1.0, ignore_eos=True)
    again = client.generate(PROMPT, max_new_tokens=10, temperature=1.0, ignore_eos=True, seed=first.seed)
    assert again.text == first.text and again.seed == first.seed


def test_logprobs_are_the_models_own(client, tiny_random_checkpoint):
    import torch

    from sparseinfer.model import load_model

    opts = dict(max_new_tokens=8, temperature=0, ignore_eos=True)
    plain = client.generate(PROMPT, return_tokens=True, **opts)
    scored = client.generate(PROMPT, return_logprobs=True, **opts)
    streamed = [t for c in client.generate_stream(PROMPT, return_logprobs=True, **opts) for t in c.tokens]
    ids = [t.id for t in scored.tokens]
    assert ids == [t.id for t in plain.tokens] == [t.id for t in streamed] and len(ids) == 8
    assert all(t.logprob is None for t in plain.tokens)
    logprobs = [t.logprob for t in scored.tokens]
    assert all(isinstance(lp, float) and lp <= 0.0 for lp in logprobs)
    assert [t.logprob for t in streamed] == logprobs
    # Oracle: greedy logprobs are log_softmax of the model's raw logits (a no-cache forward, no server).
    prompt_ids = list(client.tokenize(PROMPT).ids)
    model = load_model(tiny_random_checkpoint)
    with torch.inference_mode():
        logits = model(torch.tensor([prompt_ids + ids]))[0, len(prompt_ids) - 1 : -1].float()  # (8, V)
    expected = torch.log_softmax(logits, -1).gather(-1, torch.tensor(ids)[:, None])[:, 0].tolist()
    assert logprobs == pytest.approx(expected, abs=1e-4)


@pytest.mark.parametrize(
    ("options", "field"),
    [
        ({"max_new_tokens": 0}, "stopping.max_new_tokens"),
        ({"max_new_tokens": 65}, "stopping.max_new_tokens"),  # over the server's limit
        ({"temperature": -1.0}, "sampling.temperature"),
        ({"top_p": 1.5}, "sampling.top_p"),
        ({"top_k": -2}, "sampling.top_k"),
        ({"stop": ("",)}, "stopping.stop_sequences"),
        ({"sparsity_mode": "predicted"}, "sparsity_mode"),  # no sidecar: the mode is unavailable
    ],
)
def test_server_validation_arrives_as_validation_error(client, options, field):
    with pytest.raises(sc.ValidationError, match=field) as info:
        client.generate(PROMPT, **options)
    assert info.value.code.name == "INVALID_ARGUMENT" and field in info.value.details
    with pytest.raises(sc.ValidationError, match=field):
        list(client.generate_stream(PROMPT, **options))


def test_empty_prompt_is_rejected(client):
    with pytest.raises(sc.ValidationError, match="prompt"):
        client.generate("")
    with pytest.raises(sc.ValidationError, match="prompt"):
        client.generate([])


def test_deadline_then_server_still_serves(client):
    with pytest.raises(sc.DeadlineExceeded):
        client.generate(PROMPT, max_new_tokens=64, ignore_eos=True, timeout=0.005)
    with pytest.raises(sc.DeadlineExceeded):
        for _ in client.generate_stream(PROMPT, max_new_tokens=64, ignore_eos=True, timeout=0.005):
            pass
    assert client.health() == "SERVING"
    assert client.generate(PROMPT, max_new_tokens=2).usage.generated_tokens >= 1


def test_cancel_mid_stream_frees_the_slot(client, server):
    slots = client.model_info().limits.max_batch_size
    for _ in range(slots):  # as many abandoned streams as the server has batch slots
        stream = client.generate_stream(PROMPT, max_new_tokens=64, ignore_eos=True)
        next(stream)
        stream.close()

    # Had the cancelled streams kept their slots, none of these could be admitted before the deadline.
    async def fill():
        async with AsyncClient(f"127.0.0.1:{server.port}") as other:
            calls = (
                other.generate(PROMPT, max_new_tokens=3, temperature=0, timeout=30) for _ in range(slots)
            )
            return await asyncio.gather(*calls)

    results = asyncio.run(fill())
    assert len(results) == slots and all(r.usage.generated_tokens >= 1 for r in results)


def test_async_concurrent_requests_equal_single_runs(server):
    async def run():
        async with AsyncClient(f"127.0.0.1:{server.port}", timeout=120) as client:
            prompts = [f"{PROMPT} {i}" for i in range(12)]
            alone = [
                await client.generate(p, max_new_tokens=8, temperature=0, ignore_eos=True) for p in prompts
            ]
            together = await asyncio.gather(
                *(client.generate(p, max_new_tokens=8, temperature=0, ignore_eos=True) for p in prompts)
            )
            streamed = [c async for c in client.generate_stream(prompts[0], max_new_tokens=8, temperature=0,
                                                                   ignore_eos=True)]  # fmt: skip
            info = await client.model_info()
            return alone, together, streamed, info, await client.health()

    alone, together, streamed, info, health = asyncio.run(run())
    assert [r.text for r in together] == [r.text for r in alone]
    assert "".join(c.text for c in streamed) == alone[0].text
    assert info.model_id and health == "SERVING"


def test_cli_against_the_real_server(server):
    out, err = io.StringIO(), io.StringIO()
    code = cli_main(["--target", f"127.0.0.1:{server.port}", "generate", PROMPT, "--stream", "--temperature",
                     "0", "--max-new-tokens", "5", "--ignore-eos"], out, err)  # fmt: skip
    assert code == 0 and "finish: length" in err.getvalue() and "5 tokens" in err.getvalue()
    out2 = io.StringIO()
    argv = ["--target", f"127.0.0.1:{server.port}", "generate", PROMPT, "--json", "--temperature", "0"]
    code = cli_main([*argv, "--max-new-tokens", "5", "--ignore-eos"], out2, io.StringIO())
    assert code == 0 and json.loads(out2.getvalue())["text"] + "\n" == out.getvalue()


def test_auth_token(tiny_random_checkpoint):
    handle = serving.start_server(ServeConfig(model=tiny_random_checkpoint, port=0, auth_token="let-me-in"))
    try:
        target = f"127.0.0.1:{handle.port}"
        with Client(target) as anonymous, pytest.raises(sc.Unauthenticated):
            anonymous.generate(PROMPT, max_new_tokens=2)
        with Client(target, token="wrong") as wrong, pytest.raises(sc.Unauthenticated):
            list(wrong.generate_stream(PROMPT, max_new_tokens=2))
        with Client(target, token="let-me-in") as good:
            assert good.generate(PROMPT, max_new_tokens=2).usage.generated_tokens >= 1
    finally:
        handle.stop(grace=1.0)


def _self_signed(directory: Path) -> tuple[Path, Path]:
    key, cert = directory / "key.pem", directory / "cert.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-subj", "/CN=sparseinfer.test", "-addext", "subjectAltName=DNS:sparseinfer.test",
         "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )  # fmt: skip
    return key, cert


def test_tls(tiny_random_checkpoint, tmp_path):
    if subprocess.run(["which", "openssl"], capture_output=True).returncode != 0:
        pytest.skip("openssl is needed to make a test certificate")
    key, cert = _self_signed(tmp_path)
    handle = serving.start_server(
        ServeConfig(model=tiny_random_checkpoint, port=0, tls_cert=cert, tls_key=key)
    )
    try:
        target = f"127.0.0.1:{handle.port}"
        with Client(target, root_certificates=cert, server_name="sparseinfer.test") as secure:
            assert secure.generate(PROMPT, max_new_tokens=2).usage.generated_tokens >= 1
        with Client(target, retry=sc.NO_RETRY) as plaintext, pytest.raises(sc.Unavailable):
            plaintext.generate(PROMPT, max_new_tokens=2, timeout=5)
    finally:
        handle.stop(grace=1.0)


def test_stopped_server_is_unavailable_after_retries(tiny_random_checkpoint):
    handle = serving.start_server(ServeConfig(model=tiny_random_checkpoint, port=0))
    target = f"127.0.0.1:{handle.port}"
    handle.stop(grace=0.5)
    with Client(target, retry=FAST_RETRY) as client, pytest.raises(sc.Unavailable):
        client.generate(PROMPT, max_new_tokens=2, timeout=10)
