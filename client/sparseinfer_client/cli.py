"""``sparseinfer-client``: talk to a running server from the shell.

    sparseinfer-client generate "The capital of France is" --stream --max-new-tokens 32
    sparseinfer-client generate "Hello" --json            # the whole result as JSON
    sparseinfer-client tokenize "Hello world"
    sparseinfer-client info
    sparseinfer-client health

Generated text goes to stdout; the summary line (tokens, finish reason, sparsity) to stderr, so the text can
be piped. Exit status: 0 on success, 2 for bad arguments, 1 for a failed call (message on stderr).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from collections.abc import Sequence
from typing import Any, TextIO

from sparseinfer_client._channel import DEFAULT_TARGET
from sparseinfer_client.client import Client
from sparseinfer_client.errors import SparseInferError
from sparseinfer_client.types import SPARSITY_MODES, GenerateResult, SparsityReport, StreamChunk

TOKEN_ENV = "SPARSEINFER_TOKEN"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sparseinfer-client", description="Client of a sparseinfer server.")
    parser.add_argument(
        "--target",
        default=DEFAULT_TARGET,
        help="server host:port, several ip:port comma-separated, or dns:///name:port (several replicas: "
        "round_robin with health checking; default: %(default)s)",
    )
    parser.add_argument("--token", default=None, help=f"bearer token (default: ${TOKEN_ENV} if set)")
    parser.add_argument("--tls", action="store_true", help="connect with TLS (system root certificates)")
    parser.add_argument("--root-certs", default=None, help="PEM file of root certificates (implies --tls)")
    parser.add_argument("--server-name", default=None, help="name to verify in the server's certificate")
    parser.add_argument("--timeout", type=float, default=None, help="seconds per call (default: none)")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="generate a completion")
    gen.add_argument("prompt")
    gen.add_argument("--stream", action="store_true", help="print tokens as they are generated")
    gen.add_argument(
        "--stream-interval", type=int, default=1, help="with --stream: tokens per message after the first"
    )
    gen.add_argument("--max-new-tokens", type=int, default=None)
    gen.add_argument("--temperature", type=float, default=None, help="0 = greedy")
    gen.add_argument("--top-k", type=int, default=None)
    gen.add_argument("--top-p", type=float, default=None)
    gen.add_argument("--repetition-penalty", type=float, default=None)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--stop", action="append", default=[], help="stop sequence (repeatable)")
    gen.add_argument("--ignore-eos", action="store_true")
    gen.add_argument("--sparsity", choices=SPARSITY_MODES, default=None, help="sparsity mode override")
    gen.add_argument("--request-id", default=None)
    gen.add_argument("--json", action="store_true", help="print the whole result (with report) as JSON")

    tok = sub.add_parser("tokenize", help="show the token ids of a text")
    tok.add_argument("text")
    sub.add_parser("info", help="describe the served model (JSON)")
    health = sub.add_parser("health", help="grpc.health.v1 status")
    health.add_argument("--service", default="")
    return parser


def summary(report: SparsityReport, tokens: int, finish: str) -> str:
    return (
        f"[{tokens} tokens, finish: {finish}, sparsity {report.mode}: computed {report.computed_share:.1%} "
        f"of dense FFN neurons, hot {report.hot_share:.1%} / cold {report.cold_share:.1%}, "
        f"FFN bytes {report.ffn_bytes_read:,} of {report.ffn_bytes_dense:,}]"
    )


def _generate(client: Client, args: argparse.Namespace, out: TextIO, err: TextIO) -> None:
    options: dict[str, Any] = {
        "max_new_tokens": args.max_new_tokens,
        "temperature": args.temperature,
        "top_k": args.top_k,
        "top_p": args.top_p,
        "repetition_penalty": args.repetition_penalty,
        "seed": args.seed,
        "stop": tuple(args.stop),
        "ignore_eos": args.ignore_eos,
        "sparsity_mode": args.sparsity,
        "request_id": args.request_id,
    }
    if args.stream and not args.json:
        last: StreamChunk | None = None
        for chunk in client.generate_stream(args.prompt, stream_interval=args.stream_interval, **options):
            out.write(chunk.text)
            out.flush()
            last = chunk
        out.write("\n")
        if last is not None and last.sparsity is not None and last.usage is not None:
            print(summary(last.sparsity, last.usage.generated_tokens, str(last.finish_reason)), file=err)
        return
    result: GenerateResult = client.generate(args.prompt, **options)
    if args.json:
        print(json.dumps(dataclasses.asdict(result), indent=2), file=out)
    else:
        print(result.text, file=out)
        print(summary(result.sparsity, result.usage.generated_tokens, result.finish_reason), file=err)


def main(argv: Sequence[str] | None = None, out: TextIO | None = None, err: TextIO | None = None) -> int:
    out = out or sys.stdout
    err = err or sys.stderr
    args = build_parser().parse_args(argv)
    token = args.token if args.token is not None else os.environ.get(TOKEN_ENV) or None
    try:
        with Client(
            args.target,
            token=token,
            tls=args.tls,
            root_certificates=args.root_certs,
            server_name=args.server_name,
            timeout=args.timeout,
        ) as client:
            if args.command == "generate":
                _generate(client, args, out, err)
            elif args.command == "tokenize":
                result = client.tokenize(args.text)
                print(json.dumps({"ids": result.ids, "pieces": result.pieces}), file=out)
            elif args.command == "info":
                print(json.dumps(dataclasses.asdict(client.model_info()), indent=2), file=out)
            else:
                status = client.health(args.service)
                print(status, file=out)
                if status != "SERVING":  # a probe (Docker HEALTHCHECK, scripts) reads the exit status
                    return 1
    except SparseInferError as error:
        print(f"sparseinfer-client: {error}", file=err)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
