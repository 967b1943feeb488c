"""Per-request sparsity modes through the server, against the engine alone with the same sparse runtime.

The oracle for tokens and for the sparsity report is ``Engine`` + ``SparseRuntime`` driven directly: the
server must return exactly what the engine computed for the request, whatever else was in the batch.
"""

from __future__ import annotations

import threading

import pytest

from sparseinfer.engine.generate import Engine
from sparseinfer.engine.modes import SparseRuntime, SparsityConfig
from sparseinfer.engine.sampling import SamplingParams
from sparseinfer.model import load_model, load_tokenizer
from sparseinfer.serving.config import Limits, ServeConfig
from sparseinfer.serving.server import start_server
from sparseinfer_client import NO_RETRY, Client

PROMPT = "sparse requests"


@pytest.fixture(scope="module")
def sparse_server(calibrated_checkpoint):
    config = ServeConfig(
        model=calibrated_checkpoint, port=0, limits=Limits(max_batch_size=4, max_new_tokens=64)
    )
    handle = start_server(config)
    yield handle
    handle.stop(grace=1.0)


def engine_alone(path, mode, params):
    model, tok = load_model(path), load_tokenizer(path)
    runtime = SparseRuntime.from_checkpoint(
        model, path, SparsityConfig(mode="dense"), max_batch=1, max_seq=128
    )
    gen = Engine(model, tok, max_batch=1, max_seq=128, sparsity=runtime)
    seq = gen.start(PROMPT, params, sparsity_mode=mode)
    events = list(gen.stream(seq))
    return [t for e in events for t in e.token_ids], seq.sparsity.report()


def test_model_info_lists_the_modes(sparse_server):
    with Client(sparse_server.address, retry=NO_RETRY) as c:
        info = c.model_info()
    assert set(info.available_sparsity_modes) == {"dense", "oracle", "predicted"}
    assert info.default_sparsity_mode == "dense"
    assert info.cett_target == pytest.approx(0.2)
    assert info.predictor_recall is not None and 0 < info.predictor_recall <= 1
    assert info.activation == "relu2"


def test_mixed_modes_in_one_batch_match_the_engine_alone(sparse_server, calibrated_checkpoint):
    kw = dict(max_new_tokens=12, temperature=0.7, seed=11, ignore_eos=True)
    params = SamplingParams(**kw)
    modes = ["dense", "oracle", "predicted"] * 2
    results: list = [None] * len(modes)
    with Client(sparse_server.address, retry=NO_RETRY) as c:

        def run(i):
            results[i] = c.generate(PROMPT, sparsity_mode=modes[i], return_tokens=True, **kw)

        threads = [threading.Thread(target=run, args=(i,)) for i in range(len(modes))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    for mode, got in zip(modes, results, strict=True):
        tokens, report = engine_alone(calibrated_checkpoint, mode, params)
        assert [t.id for t in got.tokens] == tokens
        r = got.sparsity
        assert r.mode == mode and r.tokens == report.tokens
        assert r.computed_share == pytest.approx(report.computed_share, abs=1e-12)
        assert r.ffn_bytes_read == report.ffn_bytes_read and r.ffn_bytes_dense == report.ffn_bytes_dense
        assert r.hot_share == pytest.approx(report.hot_share) and r.cold_share == pytest.approx(
            report.cold_share
        )
        for a, b in zip(r.layers, report.layers, strict=True):
            assert a.predicted_active_share == pytest.approx(b.predicted_active_share, abs=1e-12)
            assert a.true_active_share == b.true_active_share and a.recall == b.recall
        if mode == "dense":
            assert r.computed_share == 1.0
        else:
            assert r.computed_share < 1.0 and r.ffn_bytes_read < r.ffn_bytes_dense
