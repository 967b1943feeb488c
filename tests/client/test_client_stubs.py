"""The checked-in stubs must be exactly what client/scripts/gen_proto.py generates from proto/ today."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CHECKED_IN = ROOT / "client" / "sparseinfer_client" / "_proto"


def test_stubs_are_fresh(tmp_path):
    pytest.importorskip("grpc_tools", reason="grpcio-tools regenerates the stubs (pip install grpcio-tools)")
    out = tmp_path / "_proto"
    subprocess.run([sys.executable, str(ROOT / "client/scripts/gen_proto.py"), "--out", str(out)], check=True)
    generated = sorted(p.name for p in out.iterdir())
    checked_in = sorted(p.name for p in CHECKED_IN.iterdir() if p.is_file())
    assert generated == checked_in, "stub files differ; run: python client/scripts/gen_proto.py"
    stale = [name for name in generated if (out / name).read_bytes() != (CHECKED_IN / name).read_bytes()]
    assert not stale, f"stale stubs {stale}; run: python client/scripts/gen_proto.py"


def test_stubs_import_package_relative():
    # An absolute `sparseinfer.v1` import would resolve against the server package `sparseinfer`.
    for path in CHECKED_IN.glob("*.py"):
        text = path.read_text()
        assert "from sparseinfer.v1" not in text and "import sparseinfer.v1" not in text, path.name


def test_client_package_never_imports_torch():
    code = "import sys, sparseinfer_client, sparseinfer_client.cli; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
