"""The batched CPU FFN's choice between the sparse kernel and torch's GEMMs: the cost model
(hybrid.CrossoverCosts) against hand-computed values, and its calibration (engine.ffn_calibration) on real
tiers and through the engine."""

from __future__ import annotations

import json
import math

import pytest
import torch

from sparseinfer.engine import ffn_calibration as fc
from sparseinfer.engine.hybrid import DEFAULT_COSTS, CrossoverCosts, TieredFFN, make_tier
from sparseinfer.model import linear_calibration as lc
from sparseinfer.model.linear import EVERY_INPUT

D, M = 64, 128
COSTS = CrossoverCosts(per_neuron=1.0, per_pair=0.5, gemm_rows=(8, 16, 64), gemm_per_neuron=(2.0, 4.0, 10.0))


@pytest.mark.parametrize(
    ("n", "want"),
    [(1, 2.0), (8, 2.0), (12, 3.0), (16, 4.0), (40, 7.0), (64, 10.0), (128, 20.0), (96, 15.0)],
)
def test_gemm_cost_is_linear_between_rungs_flat_below_and_proportional_beyond(n, want):
    assert COSTS.gemms(n) == pytest.approx(want)


def test_gemms_win_where_the_sparse_kernel_costs_more():
    # 16 rows over m = 100 neurons: GEMMs 4 * 100 = 400; sparse 1 * union + 0.5 * pairs
    assert not COSTS.gemms_win(16, 100, union=100, pairs=600)  # 100 + 300 = 400: a tie stays sparse
    assert COSTS.gemms_win(16, 100, union=100, pairs=602)
    assert not COSTS.gemms_win(16, 100, union=50, pairs=700)  # 50 + 350


def tier_ffn(weights: str = "checkpoint", dtype=torch.bfloat16, rows_up_to: int = 2) -> TieredFFN:
    g = torch.Generator().manual_seed(0)
    w_in, w_up = ((torch.randn(M, D, generator=g) / D**0.5).to(dtype) for _ in range(2))
    w_out = (torch.randn(D, M, generator=g) / M**0.5).to(dtype)
    cpu = torch.device("cpu")
    tier = make_tier(w_in, w_up, w_out, torch.arange(M), cpu, False, hugepages=False, weights=weights)
    ffn = TieredFFN([tier], M, cpu, "silu", 0.0)
    ffn.rows_up_to = rows_up_to
    return ffn


def test_a_measured_step_takes_the_path_the_costs_choose(monkeypatch):
    ffn = tier_ffn()
    x = torch.randn(8, D).bfloat16()
    mask = torch.rand(8, M, generator=torch.Generator().manual_seed(1)) < 0.5
    union = mask.any(0).nonzero().flatten().to(torch.int32)
    t = ffn.tiers[0]
    xf, w_in, w_up, w_out_t = (v.float() for v in (x, t.w_in, t.w_up, t.w_out_t))
    h = torch.nn.functional.silu(xf @ w_in.t()) * (xf @ w_up.t())
    want = (h * mask) @ w_out_t  # the dense formula with the mask, in fp32
    gemms_cheap = CrossoverCosts(1.0, 1.0, (4,), (0.01,))
    gemms_dear = CrossoverCosts(1.0, 1.0, (4,), (1e6,))
    for costs, banned in ((gemms_cheap, "_sparse"), (gemms_dear, "_gemms")):
        ffn.costs = costs
        with monkeypatch.context() as mp:
            mp.setattr(TieredFFN, banned, lambda *a, b=banned: pytest.fail(f"{b} used"))
            got = ffn.forward(x, union, mask, 1.0)
        torch.testing.assert_close(got.float(), want, rtol=3e-2, atol=3e-2)


def test_real_calibration_of_a_small_tier_is_cached(tmp_path, monkeypatch):
    """Unfaked measurement: positive costs per rung above rows_up_to, written to the file; a second
    process reads them instead of measuring."""
    ffn = tier_ffn(rows_up_to=8)
    key = fc.ffn_key(ffn)
    assert key == "ffn:bfloat16:128x64:gated:silu:rows>8"
    cal = lc.Calibration(tmp_path / "ffn.json")
    entry = cal.measured(key, lambda: fc.measure(ffn), fc._describe)
    assert entry["gemm_rows"] == [n for n in fc.GEMM_ROWS if n > 8]
    assert all(0 < c < math.inf for c in entry["gemm_per_neuron"])
    assert entry["per_neuron"] >= 0 and entry["per_pair"] >= 0 and entry["per_neuron"] + entry["per_pair"] > 0
    assert json.loads((tmp_path / "ffn.json").read_text())[lc.machine_key()][key] == entry
    monkeypatch.setattr(fc, "measure", lambda f: pytest.fail("measured again"))
    again = lc.Calibration(tmp_path / "ffn.json").measured(key, lambda: fc.measure(ffn), fc._describe)
    assert again == entry
    assert fc.costs_of(entry).gemm_rows == tuple(entry["gemm_rows"])


def test_no_calibration_where_the_gemms_are_never_taken():
    assert fc.ffn_key(tier_ffn(rows_up_to=EVERY_INPUT)) is None  # "rows": our kernels for every input
    assert fc.ffn_key(tier_ffn(weights="q8_0")) is None  # quantized tiers always take the sparse kernel


def test_the_engine_calibrates_each_ffn_shape_once(calibrated_checkpoint, tmp_path, monkeypatch):
    from sparseinfer.engine.factory import EngineConfig, load_engine
    from sparseinfer.engine.modes import SparsityConfig

    measured = []
    entry = {"per_neuron": 1.0, "per_pair": 2.0, "gemm_rows": [4, 8], "gemm_per_neuron": [3.0, 5.0]}
    monkeypatch.setattr(fc, "calibration", lambda: lc.Calibration(tmp_path / "ffn.json"))
    monkeypatch.setattr(fc, "measure", lambda ffn: measured.append(ffn) or entry)
    config = EngineConfig(dtype=torch.bfloat16, sparsity=SparsityConfig(mode="predicted"), dense_linear="2")
    engine = load_engine(calibrated_checkpoint, config)
    ffns = [layer.mlp.tiered for layer in engine.model.layers]
    assert len(measured) == 1 and measured[0] is ffns[0]
    assert all(f.costs == fc.costs_of(entry) for f in ffns)
    rows = EngineConfig(dtype=torch.bfloat16, sparsity=SparsityConfig(mode="predicted"), dense_linear="rows")
    engine = load_engine(calibrated_checkpoint, rows)
    assert len(measured) == 1 and engine.model.layers[0].mlp.tiered.costs == DEFAULT_COSTS
