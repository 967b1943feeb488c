"""``sparseinfer serve``: flags → one frozen ``ServeConfig`` → ``serving.server.serve``.

With no arguments it serves the bundled model on 127.0.0.1:50051. The auth token may come from
``--auth-token`` or, so that it stays out of process listings, from ``$SPARSEINFER_AUTH_TOKEN``
(read by ``cli.read_environment``).
"""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path
from typing import Any

from sparseinfer.model.quant import WEIGHT_FORMATS
from sparseinfer.serving.config import EVENT_LOOPS, Limits, ServeConfig, new_event_loop

_DEFAULTS = ServeConfig()
_LIMITS = Limits()


def _int(low: int) -> Any:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value

    return parse


def register(sub: Any) -> None:
    """Add the ``serve`` subcommand to the CLI's subparsers."""
    from sparseinfer.model.config import DTYPES

    p = sub.add_parser("serve", help="serve a model over gRPC (default: the bundled model, 127.0.0.1:50051)")
    p.add_argument("--model", help="checkpoint dir (default: $SPARSEINFER_MODEL, else the bundled model)")
    p.add_argument("--host", default=_DEFAULTS.host, help="address to bind (0.0.0.0 for all interfaces)")
    p.add_argument("--port", type=_int(0), default=_DEFAULTS.port, help="0 picks a free port")
    p.add_argument(
        "--sparsity",
        choices=("dense", "oracle", "predicted"),
        default=str(_DEFAULTS.sparsity),
        help="default FFN execution mode of requests (each request may choose its own)",
    )
    p.add_argument("--gpu-memory", metavar="SIZE", help="budget for hot neurons on the GPU: 4GiB, 512MB, 0")
    p.add_argument("--max-batch-size", type=_int(1), default=_LIMITS.max_batch_size)
    p.add_argument("--max-queue", type=_int(1), default=_LIMITS.max_queue, help="waiting requests")
    p.add_argument("--max-total-tokens", type=_int(1), help="Σ prompt + max_new_tokens of admitted requests")
    p.add_argument(
        "--max-prefill-tokens",
        type=_int(1),
        default=_LIMITS.max_prefill_tokens,
        help="tokens of one batched prefill, padding included (default %(default)s)",
    )
    p.add_argument("--max-prompt-tokens", type=_int(1), help="default: the context length minus one")
    p.add_argument("--max-new-tokens", type=_int(1), default=_LIMITS.max_new_tokens)
    p.add_argument("--auth-token", help="require `authorization: Bearer TOKEN` (or $SPARSEINFER_AUTH_TOKEN)")
    p.add_argument("--tls-cert", type=Path, help="PEM certificate chain (with --tls-key)")
    p.add_argument("--tls-key", type=Path, help="PEM private key (with --tls-cert)")
    p.add_argument("--metrics-port", type=_int(0), help="serve Prometheus metrics on this port")
    p.add_argument(
        "--metrics-host",
        default=_DEFAULTS.metrics_host,
        help="address the metrics port binds (0.0.0.0 for Prometheus in a pod; unauthenticated)",
    )
    p.add_argument(
        "--http-port",
        type=_int(0),
        help="also serve the OpenAI-compatible HTTP API on this port (off unless given; docs/openai.md)",
    )
    p.add_argument(
        "--grace-period", type=float, default=_DEFAULTS.grace_period, help="seconds to drain on SIGTERM"
    )
    p.add_argument("--dtype", choices=sorted(DTYPES), help="compute dtype (default: the checkpoint's)")
    p.add_argument(
        "--weights",
        choices=WEIGHT_FORMATS,
        default=_DEFAULTS.weights,
        help="decoder weights in the checkpoint's dtype, or quantized at load to ggml's q8_0 or q4_0 blocks",
    )
    p.add_argument("--threads", type=_int(1), help="CPU threads for torch (default: torch's choice)")
    p.add_argument(
        "--event-loop",
        choices=EVENT_LOOPS,
        default=_DEFAULTS.event_loop,
        help="the gRPC side's event loop (default %(default)s: less CPU per streamed token)",
    )
    p.add_argument("--log-level", choices=("debug", "info", "warning", "error"), default="info")
    p.set_defaults(run=_run_serve)


def serve_config(args: argparse.Namespace, env: Any) -> ServeConfig:
    """The ``ServeConfig`` of parsed flags and the environment (``cli.Environment``)."""
    from sparseinfer.cli import UsageError
    from sparseinfer.engine.placement import parse_memory

    model = args.model or env.model
    token = args.auth_token if args.auth_token is not None else getattr(env, "auth_token", None)
    try:
        config = ServeConfig(
            model=Path(model) if model else None,
            host=args.host,
            port=args.port,
            sparsity=args.sparsity,
            gpu_memory=parse_memory(args.gpu_memory) if args.gpu_memory is not None else None,
            limits=Limits(
                max_batch_size=args.max_batch_size,
                max_queue=args.max_queue,
                max_total_tokens=args.max_total_tokens,
                max_prefill_tokens=args.max_prefill_tokens,
                max_prompt_tokens=args.max_prompt_tokens,
                max_new_tokens=args.max_new_tokens,
            ),
            auth_token=token,
            tls_cert=args.tls_cert,
            tls_key=args.tls_key,
            metrics_port=args.metrics_port,
            metrics_host=args.metrics_host,
            http_port=args.http_port,
            grace_period=args.grace_period,
            dtype=args.dtype,
            weights=args.weights,
            threads=args.threads,
            event_loop=args.event_loop,
            dense_linear=env.dense_linear,
            hugepages=env.hugepages,
        )
        config.validate()
    except ValueError as e:
        raise UsageError(str(e)) from None
    for name in ("tls_cert", "tls_key"):
        path = getattr(config, name)
        if path is not None and not path.is_file():
            raise UsageError(f"--{name.replace('_', '-')} {path}: no such file")
    return config


def _run_serve(args: argparse.Namespace, env: Any) -> None:
    from sparseinfer.serving.logs import configure_logging
    from sparseinfer.serving.server import serve

    config = serve_config(args, env)
    configure_logging(args.log_level)
    with asyncio.Runner(loop_factory=lambda: new_event_loop(config.event_loop)) as runner:
        status = runner.run(serve(config))
    if status:  # a second stop signal cut the drain short (see ``serve``)
        raise SystemExit(status)
