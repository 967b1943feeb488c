"""The checked-in stubs (the client's and the server's own copy) must be exactly what
client/scripts/gen_proto.py generates from proto/ today."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
# The server ships its own stubs so that `pip install .` serves without the client package.
CHECKED_IN = [ROOT / "client" / "sparseinfer_client" / "_proto", ROOT / "server" / "sparseinfer" / "_proto"]


@pytest.mark.parametrize("checked_in", CHECKED_IN, ids=lambda p: str(p.relative_to(ROOT)))
def test_stubs_are_fresh(tmp_path, checked_in):
    pytest.importorskip("grpc_tools", reason="grpcio-tools regenerates the stubs (pip install grpcio-tools)")
    out = tmp_path / "_proto"
    subprocess.run([sys.executable, str(ROOT / "client/scripts/gen_proto.py"), "--out", str(out)], check=True)
    rerun = f"python client/scripts/gen_proto.py --out {checked_in.relative_to(ROOT)}"
    generated = sorted(p.name for p in out.iterdir())
    files = sorted(p.name for p in checked_in.iterdir() if p.is_file())
    assert generated == files, f"stub files differ; run: {rerun}"
    stale = [name for name in generated if (out / name).read_bytes() != (checked_in / name).read_bytes()]
    assert not stale, f"stale stubs {stale}; run: {rerun}"


@pytest.mark.parametrize("checked_in", CHECKED_IN, ids=lambda p: str(p.relative_to(ROOT)))
def test_stubs_import_package_relative(checked_in):
    # An absolute `sparseinfer.v1` import would resolve against the server package `sparseinfer`.
    for path in checked_in.glob("*.py"):
        text = path.read_text()
        assert "from sparseinfer.v1" not in text and "import sparseinfer.v1" not in text, path.name


def test_both_stubs_share_one_descriptor():
    # Both copies register the same file in protobuf's default pool: the same message classes, so a
    # process holding both (tests, bench serve) can pass messages between them.
    from sparseinfer._proto import sparseinfer_pb2 as server_pb
    from sparseinfer_client._proto import sparseinfer_pb2 as client_pb

    assert server_pb.GenerateRequest is client_pb.GenerateRequest


def test_client_package_never_imports_torch():
    code = "import sys, sparseinfer_client, sparseinfer_client.cli; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


SERVE_WITHOUT_CLIENT = """
import sys, importlib.abc
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "sparseinfer_client":
            raise ImportError("blocked: " + name)
sys.meta_path.insert(0, Block())
import grpc
from sparseinfer._proto import sparseinfer_pb2 as pb, sparseinfer_pb2_grpc as pb_grpc
from sparseinfer.serving.config import ServeConfig
from sparseinfer.serving.server import start_server
handle = start_server(ServeConfig(port=0))
with grpc.insecure_channel(f"127.0.0.1:{handle.port}") as channel:
    stopping = pb.StoppingCriteria(max_new_tokens=3, ignore_eos=True)
    request = pb.GenerateRequest(text="Once upon a time", stopping=stopping)
    reply = pb_grpc.SparseInferStub(channel).Generate(request, timeout=60)
handle.stop()
print("generated", reply.usage.generated_tokens)
"""


def test_server_serves_without_the_client_package():
    # `pip install .` without ./client must give a working server: block the client package, serve the
    # bundled model and answer a real request with the server's own stubs.
    proc = subprocess.run([sys.executable, "-c", SERVE_WITHOUT_CLIENT], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "generated 3" in proc.stdout
