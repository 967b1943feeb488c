"""`sparseinfer serve` flags → ServeConfig (the server itself: start_server and a subprocess test)."""

from __future__ import annotations

from pathlib import Path

import pytest

from sparseinfer.cli import Environment, UsageError, build_parser, read_environment
from sparseinfer.serving.command import serve_config
from sparseinfer.serving.config import Limits, ServeConfig

NO_ENV = Environment()


def parse(*argv, env=NO_ENV):
    return serve_config(build_parser().parse_args(["serve", *argv]), env)


def test_no_arguments_serve_the_bundled_model_on_the_default_port():
    config = parse()
    assert config == ServeConfig()  # model None = bundled; 127.0.0.1:50051
    assert config.model is None and (config.host, config.port) == ("127.0.0.1", 50051)


def test_flags_reach_the_config():
    config = parse(
        "--model", "/m", "--port", "0", "--sparsity", "predicted", "--gpu-memory", "1GiB",
        "--max-batch-size", "4", "--max-queue", "9", "--max-total-tokens", "999",
        "--max-prompt-tokens", "100", "--max-new-tokens", "50", "--metrics-port", "9100",
        "--grace-period", "2.5", "--threads", "1", "--event-loop", "asyncio", "--metrics-host", "0.0.0.0",
        "--http-port", "8000",
    )  # fmt: skip
    assert config.model == Path("/m") and config.port == 0 and config.sparsity == "predicted"
    assert config.gpu_memory == 2**30 and config.metrics_port == 9100 and config.grace_period == 2.5
    assert config.event_loop == "asyncio" and ServeConfig().event_loop == "uvloop"
    assert config.metrics_host == "0.0.0.0" and ServeConfig().metrics_host == "127.0.0.1"
    assert config.http_port == 8000 and ServeConfig().http_port is None
    assert config.limits == Limits(
        max_batch_size=4, max_queue=9, max_total_tokens=999, max_prompt_tokens=100, max_new_tokens=50
    )


def test_auth_token_from_the_environment_and_flag_precedence():
    env = read_environment({"SPARSEINFER_AUTH_TOKEN": "from-env", "SPARSEINFER_MODEL": "/env-model"})
    assert parse(env=env).auth_token == "from-env"
    assert parse(env=env).model == Path("/env-model")
    assert parse("--auth-token", "flag", env=env).auth_token == "flag"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--tls-cert", "/c.pem"], "--tls-cert and --tls-key"),
        (["--grace-period", "-1"], "--grace-period"),
        (["--gpu-memory", "lots"], "--gpu-memory"),
        (["--auth-token", ""], "--auth-token"),
    ],
)
def test_bad_flags_are_usage_errors(argv, message):
    with pytest.raises(UsageError, match=message):
        parse(*argv)


@pytest.mark.parametrize("argv", [["--port", "-1"], ["--max-batch-size", "0"], ["--sparsity", "magic"]])
def test_argparse_rejects_out_of_range_values(argv):
    with pytest.raises(SystemExit):
        parse(*argv)
