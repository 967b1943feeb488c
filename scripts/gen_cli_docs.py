"""Write docs/cli.md, the reference of every `sparseinfer` command and flag, from the CLI's own parser (and
the environment variables the project reads), so the reference cannot drift from the code: a test
regenerates it and compares (tests/test_docs.py). Usage: python scripts/gen_cli_docs.py [--out FILE]"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

ENVIRONMENT = [
    ("SPARSEINFER_MODEL", "sparseinfer", "default for `--model` of `generate` and `serve`"),
    ("SPARSEINFER_AUTH_TOKEN", "sparseinfer", "default for `serve --auth-token` (keeps it out of `ps`)"),
    (
        "SPARSEINFER_DENSE_LINEAR",
        "sparseinfer",
        "`auto` (default), `torch`, `rows` or a number N: the kernel of the dense projections, decided once "
        "at load (`model/linear.py`). `auto`: measured, per weight shape, the first time a machine loads it "
        "(`model/linear_calibration.py`, a second or so per shape), and cached in "
        "`$XDG_CACHE_HOME/sparseinfer/dense-linear.json` (delete it to recalibrate): our row kernels for "
        "inputs of up to as many rows as they beat torch at, torch beyond. `torch`/`rows`: one of them "
        "for every input; N: ours for inputs of up to N rows. Unless `rows`, the sparse FFN's batched steps "
        "(prefill, batches) choose between the sparse kernel and torch's GEMMs from costs measured the "
        "same way (`engine/ffn_calibration.py`, about 1.5 s per 7B-shaped layer), cached in "
        "`$XDG_CACHE_HOME/sparseinfer/ffn-crossover.json`",
    ),
    ("SPARSEINFER_HUGEPAGES", "sparseinfer", "`0` keeps CPU weights out of transparent huge pages"),
    (
        "SPARSEINFER_CPU_ISA",
        "the compiled kernels",
        "`scalar`, `avx2`, `avx512` or `avx512bf16` (AVX-512 plus bf16 dot products): force one CPU path "
        "(tests use it; default: the best the CPU has)",
    ),
    ("SPARSEINFER_CUDA", "the build (setup.py)", "`1` forces the CUDA kernels into the build, `0` forbids"),
    ("SPARSEINFER_TOKEN", "sparseinfer-client", "default bearer token of the client CLI"),
]


def _default(action: argparse.Action) -> str:
    d = action.default
    if d is None or d is False or d == [] or d == argparse.SUPPRESS:
        return ""
    if isinstance(d, list):
        d = ",".join(str(x) for x in d)
    return f"`{d}`"


def _help(action: argparse.Action) -> str:
    text = (action.help or "").replace("%%", "%")
    if "%(default)s" in text:
        text = text.replace("%(default)s", str(action.default))
    return text.replace("|", "\\|")


def _commands(parser: argparse.ArgumentParser, prefix: str) -> Iterator[tuple[str, argparse.ArgumentParser]]:
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        yield prefix, parser
        return
    helps = {a.dest: a.help for a in subs[0]._choices_actions}
    for name, sub in subs[0].choices.items():
        sub.description = sub.description or helps.get(name)
        yield from _commands(sub, f"{prefix} {name}")


def render() -> str:
    from sparseinfer.cli import build_parser

    out = [
        "# Command-line reference",
        "",
        "Generated from the parser by `scripts/gen_cli_docs.py` (a test fails when this file is stale).",
        "Every command also answers `--help`.",
        "",
    ]
    for name, parser in _commands(build_parser(), "sparseinfer"):
        out += [f"## `{name}`", ""]
        if parser.description:
            out += [parser.description, ""]
        out += ["| argument | default | meaning |", "|---|---|---|"]
        for a in parser._actions:
            if isinstance(a, argparse._HelpAction):
                continue
            names = ", ".join(a.option_strings) if a.option_strings else (a.metavar or a.dest)
            choices = f" (one of {', '.join(map(str, a.choices))})" if a.choices else ""
            out.append(f"| `{names}` | {_default(a)} | {_help(a)}{choices} |")
        out.append("")
    out += ["## Environment variables", "", "| variable | read by | meaning |", "|---|---|---|"]
    out += [f"| `{n}` | {who} | {what} |" for n, who, what in ENVIRONMENT]
    return "\n".join(out) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "cli.md")
    args = p.parse_args()
    args.out.write_text(render())
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
