"""`sparseinfer bench kernels` end to end on a tiny FFN shape: the pipeline, the byte accounting, the table.

The speed figures themselves are not asserted (that is the benchmark's job, on LLaMA shapes); what is checked
is that every case is measured, the union densities and bytes are what the configuration implies, and the
markdown / JSON carry them.
"""

import io
import json

import pytest
import torch

from sparseinfer import reference
from sparseinfer.bench import kernels, kernels_measure
from sparseinfer.bench.kernels_measure import KernelBenchConfig


@pytest.fixture
def tiny_shapes(monkeypatch):
    shapes = {
        "tiny-gated": {"d": 64, "m": 96, "gated": True, "activation": "relu"},
        "tiny-nongated": {"d": 48, "m": 144, "gated": False, "activation": "relu2"},
    }
    monkeypatch.setattr(kernels_measure, "SHAPES", shapes)
    # A 1 GiB bandwidth probe and a 128 MiB cache flush are pointless at this size.
    monkeypatch.setattr(kernels, "measure_bandwidth", lambda: 1e9)
    monkeypatch.setattr(kernels, "CacheFlush", lambda: lambda: None)
    return shapes


def test_bench_runs_every_case_and_writes_results(tiny_shapes, tmp_path):
    config = KernelBenchConfig(
        shapes=tuple(tiny_shapes),
        dtypes=("float32", "bfloat16"),
        sparsities=(0.0, 0.9),
        batches=(1, 3),
        crossover_densities=(0.5, 1.0),
        repeats=1,
    )
    log = io.StringIO()
    result = kernels.run_kernel_bench(config, log)
    rows = result["rows"]
    assert len(rows) == 2 * 2 * 2 * 2
    for r in rows:
        m = tiny_shapes[r["shape"]]["m"]
        d = tiny_shapes[r["shape"]]["d"]
        k = max(1, round((1 - r["sparsity"]) * m))
        if r["batch"] == 1:
            assert r["union_density"] == pytest.approx(k / m)  # one row: the union is its top-k
        assert k / m <= r["union_density"] <= 1.0
        esize = 4 if r["dtype"] == "float32" else 2
        row_bytes = d * esize
        n = round(r["union_density"] * m)
        per_neuron = 3 if tiny_shapes[r["shape"]]["gated"] else 2
        assert row_bytes * n <= r["kernel_bytes"] <= per_neuron * row_bytes * n
        assert r["sparse_ms"] > 0 and r["dense_ms"] > 0 and r["kernel_bw_share"] > 0
        assert r["best_kernel_ms"] <= r["kernel_ms"] and r["best_kernel_bw_share"] >= r["kernel_bw_share"]
        assert r["kernel_vs_read"] == pytest.approx(r["read_same_bytes_ms"] / r["kernel_ms"])
    assert len(result["crossover"]) == 2 * 2 * 2
    assert "building tiny-gated float32" in log.getvalue()
    kernels.write_results(result, tmp_path)
    table = (tmp_path / "kernels.md").read_text()
    assert table.count("| tiny-gated |") == 8 + 4 and "## Batch crossover" in table  # cases + crossovers
    assert json.loads((tmp_path / "kernels.json").read_text())["rows"] == json.loads(json.dumps(rows))


def test_bench_layer_predictor_picks_the_largest_gates(tiny_shapes):
    """The benchmark's predictor is exact by construction (W_in = U V): its scores are the gate
    pre-activations, so the selected set is the true top-k the sparse op is then asked to compute."""
    layer = kernels_measure.build_layer("tiny-gated", torch.float32, seed=0)
    x = torch.randn(2, 64)
    scores = (x @ layer.p_v.t()) @ layer.p_u.t()  # (2, 96)
    torch.testing.assert_close(scores, x @ layer.w_in.t(), rtol=1e-4, atol=1e-4)
    mask, union = reference.select_active(scores, 0.0, 10)
    assert (mask.sum(1) == 10).all() and union.numel() >= 10


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="--shapes"):
        KernelBenchConfig(shapes=("nope",)).validate()
    with pytest.raises(ValueError, match="--sparsities"):
        KernelBenchConfig(sparsities=(1.0,)).validate()
    with pytest.raises(ValueError, match="--batches"):
        KernelBenchConfig(batches=(0,)).validate()
