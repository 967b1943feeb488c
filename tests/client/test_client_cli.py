"""`sparseinfer-client` against the scripted fake server (in-process main(), and the installed script)."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import grpc
import pytest

from sparseinfer_client.cli import main


def run(argv):
    out, err = io.StringIO(), io.StringIO()
    code = main(argv, out, err)
    return code, out.getvalue(), err.getvalue()


def test_generate_stream_prints_text_and_summary(fake_server):
    argv = [
        "--target",
        fake_server.target,
        "generate",
        "hi",
        "--stream",
        "--seed",
        "3",
        "--stream-interval",
        "4",
    ]
    code, out, err = run(argv)
    assert code == 0
    assert out == "t0 t1 t2 \n"
    assert "finish: length" in err and "computed 25.0%" in err
    request = fake_server.servicer.calls[-1][2]
    assert request.text == "hi" and request.sampling.seed == 3 and request.stream_interval == 4


def test_generate_json_and_options(fake_server):
    code, out, _ = run(
        ["--target", fake_server.target, "--token", "tk", "generate", "hi", "--json", "--temperature", "0",
         "--stop", "a", "--stop", "b", "--sparsity", "predicted", "--max-new-tokens", "5"]
    )  # fmt: skip
    assert code == 0
    result = json.loads(out)
    assert result["text"] == "hello world" and result["sparsity"]["layers"][0]["recall"] == 0.9
    name, metadata, request = fake_server.servicer.calls[-1]
    assert name == "Generate" and metadata["authorization"] == "Bearer tk"
    assert list(request.stopping.stop_sequences) == ["a", "b"] and request.stopping.max_new_tokens == 5
    assert request.sampling.HasField("temperature") and request.sampling.temperature == 0


def test_token_from_environment(fake_server, monkeypatch):
    monkeypatch.setenv("SPARSEINFER_TOKEN", "envtok")
    assert run(["--target", fake_server.target, "tokenize", "ab"])[0] == 0
    assert fake_server.servicer.calls[-1][1]["authorization"] == "Bearer envtok"


def test_tokenize_info_health(fake_server):
    code, out, _ = run(["--target", fake_server.target, "tokenize", "ab"])
    assert code == 0 and json.loads(out) == {"ids": [97, 98], "pieces": ["a", "b"]}
    code, out, _ = run(["--target", fake_server.target, "info"])
    assert code == 0 and json.loads(out)["neurons_per_layer"] == [128, 128]
    code, out, _ = run(["--target", fake_server.target, "health"])
    assert code == 0 and out.strip() == "SERVING"
    # A probe reads the exit status: anything but SERVING fails it.
    code, out, _ = run(["--target", fake_server.target, "health", "--service", "sparseinfer.v1.SparseInfer"])
    assert code == 1 and out.strip() == "NOT_SERVING"


def test_failed_call_exits_1_with_the_status(fake_server):
    fake_server.servicer.script.fail_first = [grpc.StatusCode.INVALID_ARGUMENT]
    code, out, err = run(["--target", fake_server.target, "generate", "hi"])
    assert code == 1 and out == ""
    assert "INVALID_ARGUMENT: scripted INVALID_ARGUMENT" in err


def test_bad_arguments_exit_2():
    with pytest.raises(SystemExit) as info:
        run(["generate", "hi", "--sparsity", "bogus"])
    assert info.value.code == 2


def installed_script(name):
    """The console script the README's install put beside this interpreter (the venv's bin/).

    Only what that install creates may be relied on: not PATH, not a path on a developer's machine.
    """
    exe = Path(sys.executable).with_name(name)
    assert exe.is_file(), (
        f"{name} is not installed beside {sys.executable}: install ./client as the README says"
    )
    return str(exe)


def test_installed_console_script(fake_server):
    exe = installed_script("sparseinfer-client")
    done = subprocess.run(
        [exe, "--target", fake_server.target, "generate", "hi", "--stream"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == "t0 t1 t2 \n"
