"""The ``sparseinfer`` CLI: generate streams what the library generates; user errors exit 2 with one line."""

import os
import subprocess
import sys

import pytest

from sparseinfer.cli import main, read_environment
from sparseinfer.engine import Engine, SamplingParams
from sparseinfer.model import load_model, load_tokenizer

PROMPT = "Once upon a time"


def _run(argv, capsys):
    try:
        code = main(argv)
    except SystemExit as e:  # argparse exits on bad flags
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def _library_text(path, params):
    model, tok = load_model(path), load_tokenizer(path)
    return Engine(model, tok).generate(PROMPT, params).text


@pytest.mark.parametrize(
    ("flags", "params"),
    [
        (
            ["--temperature", "0", "--max-new-tokens", "12"],
            SamplingParams(temperature=0.0, max_new_tokens=12),
        ),
        (
            [
                "--temperature",
                "0.9",
                "--top-k",
                "40",
                "--top-p",
                "0.95",
                "--seed",
                "7",
                "--max-new-tokens",
                "15",
            ],
            SamplingParams(temperature=0.9, top_k=40, top_p=0.95, seed=7, max_new_tokens=15),
        ),
    ],
    ids=["greedy", "seeded"],
)
def test_generate_streams_the_library_output(tiny_random_checkpoint, capsys, flags, params):
    code, out, err = _run(
        ["generate", "--model", str(tiny_random_checkpoint), "--prompt", PROMPT, *flags], capsys
    )
    assert code == 0, err
    assert out == _library_text(tiny_random_checkpoint, params)
    summary = err.strip().splitlines()[-1]
    for part in ("prompt tokens: 5", "generated tokens", "TTFT", "tokens/s"):
        assert part in summary


def test_generate_as_a_module(tiny_random_checkpoint):
    argv = ["generate", "--model", str(tiny_random_checkpoint), "--prompt", PROMPT, "--temperature", "0"]
    argv += ["--max-new-tokens", "8", "--threads", "1", "--dtype", "float32"]
    proc = subprocess.run(
        [sys.executable, "-m", "sparseinfer.cli", *argv], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == _library_text(
        tiny_random_checkpoint, SamplingParams(temperature=0.0, max_new_tokens=8)
    )
    assert "Traceback" not in proc.stderr


def test_stop_and_model_from_environment(tiny_random_checkpoint, capsys, monkeypatch):
    monkeypatch.setenv("SPARSEINFER_MODEL", str(tiny_random_checkpoint))
    params = SamplingParams(temperature=0.0, max_new_tokens=30)
    full = _library_text(tiny_random_checkpoint, params)
    stop = full[5:7]
    code, out, _ = _run(["generate", "--prompt", PROMPT, "--temperature", "0", "--stop", stop], capsys)
    assert code == 0
    assert out == full[: full.index(stop)]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--temperature", "-1"], "temperature"),
        (["--top-p", "0"], "top_p"),
        (["--top-k", "-5"], "top_k"),
        (["--max-new-tokens", "0"], "max_new_tokens"),
        (["--repetition-penalty", "0"], "repetition_penalty"),
        (["--stop", ""], "stop"),
        (["--max-new-tokens", "100000"], "context length"),
        (["--temperature", "hot"], "--temperature"),
        (["--threads", "0"], "--threads"),
        (["--dtype", "int8"], "--dtype"),
        (["--no-such-flag"], "unrecognized"),
    ],
)
def test_bad_flags_exit_2_with_a_message(tiny_random_checkpoint, capsys, args, message):
    code, out, err = _run(
        ["generate", "--model", str(tiny_random_checkpoint), "--prompt", "x", *args], capsys
    )
    assert code == 2
    assert message in err
    assert "Traceback" not in err and out == ""


def test_bad_model_paths_exit_2(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("SPARSEINFER_MODEL", raising=False)
    import sparseinfer.model.bundled as bundled

    def no_bundle():
        raise FileNotFoundError("the bundled model at X is incomplete (missing model.safetensors)")

    monkeypatch.setattr(bundled, "bundled_model_path", no_bundle)  # as if the package data were missing
    code, _, err = _run(["generate", "--prompt", "x"], capsys)
    assert code == 2 and "bundled model" in err and "Traceback" not in err
    code, _, err = _run(["generate", "--model", str(tmp_path / "missing"), "--prompt", "x"], capsys)
    assert code == 2 and "not a directory" in err
    (tmp_path / "config.json").write_text("{not json")
    (tmp_path / "tokenizer.json").write_text("{}")
    code, _, err = _run(["generate", "--model", str(tmp_path), "--prompt", "x"], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and str(tmp_path) in err


def test_random_checkpoint_writes_a_loadable_model(tmp_path, capsys):
    path = tmp_path / "demo"
    flags = ["--hidden", "32", "--layers", "3", "--heads", "2", "--kv-heads", "1", "--vocab", "300"]
    code, _, err = _run(["random-checkpoint", str(path), *flags, "--activation", "relu", "--gated"], capsys)
    assert code == 0, err
    model = load_model(path)
    assert (model.config.hidden_size, model.config.num_layers, model.config.vocab_size) == (32, 3, 300)
    assert model.config.ffn_gated and model.config.activation == "relu"
    bad = ["random-checkpoint", str(tmp_path / "bad"), "--hidden", "30", "--heads", "4"]
    code, _, err = _run(bad, capsys)
    assert code == 2 and "--heads" in err


def test_a_subcommand_is_required(capsys):
    code, _, err = _run([], capsys)
    assert code == 2 and "COMMAND" in err


def test_environment_is_read_only_when_asked():
    assert read_environment({}).model is None
    assert read_environment({"SPARSEINFER_MODEL": "/m"}).model == "/m"
    assert read_environment({"SPARSEINFER_MODEL": ""}).model is None
    assert read_environment().model == (os.environ.get("SPARSEINFER_MODEL") or None)
