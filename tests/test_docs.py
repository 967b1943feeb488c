"""docs/cli.md is generated from the CLI's parser: regenerating it must give the checked-in file."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_cli_reference_is_current():
    spec = importlib.util.spec_from_file_location("gen_cli_docs", ROOT / "scripts" / "gen_cli_docs.py")
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    assert (ROOT / "docs" / "cli.md").read_text() == gen.render(), "run `python scripts/gen_cli_docs.py`"


def test_every_environment_variable_the_code_reads_is_documented():
    import re

    reference = (ROOT / "docs" / "cli.md").read_text()
    read = set()
    for path in (
        list((ROOT / "server").rglob("*.py")) + list((ROOT / "client").rglob("*.py")) + [ROOT / "setup.py"]
    ):
        read |= set(re.findall(r"\"(SPARSEINFER_[A-Z_]+)\"", path.read_text()))
    for path in (ROOT / "csrc").rglob("*.cpp"):
        read |= set(re.findall(r"\"(SPARSEINFER_[A-Z_]+)\"", path.read_text()))
    assert read and all(f"`{name}`" in reference for name in read), sorted(
        n for n in read if f"`{n}`" not in reference
    )


def test_the_readme_python_example_runs(tiny_llama_checkpoint, capsys):
    """The README's Python snippet, as written, against a real server (its address swapped in)."""
    import re

    from sparseinfer.serving.config import ServeConfig
    from sparseinfer.serving.server import start_server

    readme = (ROOT / "README.md").read_text()
    grpc_snippet, openai_snippet = re.findall(r"```python\n(.*?)```", readme, flags=re.S)
    with start_server(ServeConfig(model=tiny_llama_checkpoint, port=0)) as handle:
        exec(grpc_snippet.replace("127.0.0.1:50051", handle.address), {})
    printed = capsys.readouterr().out
    assert printed.strip() and float(printed.split()[-1]) == 1.0  # dense: every neuron computed
    # The OpenAI snippet against the bundled model, whose id it names.
    with start_server(ServeConfig(port=0, http_port=0)) as handle:
        exec(openai_snippet.replace("127.0.0.1:8000", f"127.0.0.1:{handle.http_port}"), {})
    assert capsys.readouterr().out.strip()
