"""The engine chooses the kernels of its sparse runtime's projections (FFN tiers, predictors) as it does
the model's (model.linear.use_row_kernels), once every weight is in place."""

import torch

from sparseinfer.model import linear as lin
from sparseinfer.model import linear_calibration as lc


def timer_torch_wins_from_3(calls):
    def timer(weights, n):
        calls.append((tuple(weights[0].shape), len(weights), n))
        return {"rows": float(n), "torch": n + (-0.5 if n >= 3 else 0.5)}

    return timer


def test_the_engine_calibrates_its_sparse_runtime_too(calibrated_checkpoint, tmp_path, monkeypatch):
    from sparseinfer.engine.factory import EngineConfig, load_engine
    from sparseinfer.engine.modes import SparsityConfig

    calls = []
    timer = timer_torch_wins_from_3(calls)
    monkeypatch.setattr(lin, "calibration", lambda: lc.Calibration(tmp_path / "c.json", timer))
    config = EngineConfig(dtype=torch.bfloat16, sparsity=SparsityConfig(mode="predicted"))
    engine = load_engine(calibrated_checkpoint, config)
    ffn = engine.model.layers[0].mlp
    assert ffn.tiered.rows_up_to == 2 and ffn.predictor.rows_up_to == {"w1": 2, "w2": 2}
    assert {shape for shape, *_ in calls} >= {tuple(ffn.predictor.w1.shape), tuple(ffn.predictor.w2.shape)}
    rows = EngineConfig(dtype=torch.bfloat16, sparsity=SparsityConfig(mode="predicted"), dense_linear="rows")
    ffn = load_engine(calibrated_checkpoint, rows).model.layers[0].mlp
    assert ffn.tiered.rows_up_to == ffn.predictor.rows_up_to["w1"] == lc.EVERY_INPUT
