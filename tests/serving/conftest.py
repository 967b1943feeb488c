"""A real server, in process on port 0, serving the tiny Llama checkpoint of tests/conftest.py.

``server`` is one module-scoped server with roomy limits; ``make_server(**overrides)`` starts a fresh one
with other settings (limits, auth, TLS, metrics) and stops it after the test. Helpers are in
``serving_helpers.py``.
"""

from __future__ import annotations

import grpc
import pytest

from sparseinfer.serving.config import Limits, ServeConfig
from sparseinfer.serving.server import start_server
from sparseinfer_client import NO_RETRY, Client
from sparseinfer_client._proto import sparseinfer_pb2_grpc as pb_grpc

LIMITS = Limits(max_batch_size=8, max_queue=64, max_new_tokens=200)


def config_for(checkpoint, **overrides) -> ServeConfig:
    limits = overrides.pop("limits", LIMITS)
    return ServeConfig(model=checkpoint, port=0, limits=limits, grace_period=5.0, **overrides)


@pytest.fixture(scope="module")
def server(tiny_llama_checkpoint):
    handle = start_server(config_for(tiny_llama_checkpoint))
    yield handle
    handle.stop(grace=1.0)


@pytest.fixture
def make_server(tiny_llama_checkpoint):
    handles = []

    def make(**overrides):
        config = config_for(tiny_llama_checkpoint, **overrides)
        handle = start_server(config)
        handles.append(handle)
        return handle

    yield make
    for h in handles:
        h.stop(grace=0.5)


@pytest.fixture
def client(server):
    with Client(server.address, retry=NO_RETRY, timeout=30) as c:
        yield c


@pytest.fixture
def stub(server):
    with grpc.insecure_channel(server.address) as channel:
        yield pb_grpc.SparseInferStub(channel)


@pytest.fixture(scope="module")
def calibrated_checkpoint(tmp_path_factory):
    """A tiny ReLU² checkpoint with a full sparsity sidecar made by the real toolkit (calibration at CETT 0.2,
    profile, rank-8 predictors), so that requests can run oracle and predicted."""
    import torch

    from sparseinfer.model import load_model
    from sparseinfer.model.random_checkpoint import write_random_checkpoint
    from sparseinfer.sparsity.calibrate import calibrate
    from sparseinfer.sparsity.predictor_train import train_predictors
    from sparseinfer.sparsity.profile import profile
    from sparseinfer.sparsity.sidecar import Sidecar

    path = write_random_checkpoint(tmp_path_factory.mktemp("calibrated"), intermediate=256, seed=3, std=0.2)
    model = load_model(path, dtype=torch.float32)
    seqs = torch.randint(2, model.config.vocab_size, (32, 64), generator=torch.Generator().manual_seed(0))
    sidecar = Sidecar.open(path)
    cal = calibrate(model, seqs, 0.2, progress=False)
    sidecar.set_section("calibration", cal.tensors(), cal.manifest())
    prof = profile(model, seqs, cal.thresholds, progress=False)
    sidecar.set_section("profile", prof.tensors(), prof.manifest())
    preds = train_predictors(model, seqs, cal.thresholds, rank=8, epochs=2, progress=False)
    sidecar.set_section("predictor", preds.state_tensors(), preds.manifest())
    sidecar.save()
    return path
