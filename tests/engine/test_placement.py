"""Hot/cold placement: memory strings, the budget, and the choice of the most frequent neurons."""

from __future__ import annotations

import pytest
import torch

from sparseinfer.engine.modes import SparseRuntime, SparsityConfig
from sparseinfer.engine.placement import dense_bytes, neuron_bytes, parse_memory, plan_placement
from sparseinfer.sparsity.sidecar import Sidecar


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("4GiB", 4 * 2**30),
        ("512MB", 512 * 10**6),
        ("0", 0),
        ("1048576", 2**20),
        ("1.5 gib", 3 * 2**29),
        ("2KiB", 2048),
        ("10b", 10),
    ],
)
def test_parse_memory(text, expected):
    assert parse_memory(text) == expected


@pytest.mark.parametrize("text", ["", "4XB", "-1GiB", "GiB", "4 GiB extra", "1e9", "four"])
def test_parse_memory_rejects_bad_strings_naming_the_flag(text):
    with pytest.raises(ValueError, match="--gpu-memory"):
        parse_memory(text)


def test_placement_picks_the_most_frequent_neurons_within_the_budget():
    g = torch.Generator().manual_seed(0)
    L, m, nb, dense = 3, 50, 100, 1000
    freq = torch.rand(L, m, generator=g)
    budget = dense + 37 * nb + 99  # room for 37 neurons (and a bit that fits none)
    p = plan_placement(freq, L, m, nb, budget, dense, torch.device("cpu"))
    chosen = torch.zeros(L, m, dtype=torch.bool)
    for li, ids in enumerate(p.hot):
        assert torch.equal(ids, ids.sort().values)  # ascending
        chosen[li, ids] = True
    assert int(chosen.sum()) == 37
    assert p.dense_bytes + p.hot_bytes <= budget
    # Brute force: every chosen neuron is at least as frequent as every neuron left cold.
    assert float(freq[chosen].min()) >= float(freq[~chosen].max())
    expected_share = float(freq[chosen].sum() / freq.sum())
    assert p.expected_hot_share == pytest.approx(expected_share, rel=1e-6)
    assert p.hot_bytes + p.cold_bytes == L * m * nb


def test_budget_zero_or_below_the_dense_parts_is_cpu_only():
    for budget in (0, 999):
        p = plan_placement(None, 2, 10, 8, budget, 1000, torch.device("cpu"))
        assert not p.dense_on_hot and all(h.numel() == 0 for h in p.hot) and p.hot_bytes == 0


def test_budget_for_everything_places_all_hot_without_a_profile():
    p = plan_placement(None, 2, 10, 8, 1000 + 160, 1000, torch.device("cpu"))
    assert p.dense_on_hot and all(torch.equal(h, torch.arange(10)) for h in p.hot)
    assert p.cold_bytes == 0 and p.expected_hot_share == 1.0


def test_partial_split_without_profile_names_the_command():
    with pytest.raises(ValueError, match="sparseinfer profile"):
        plan_placement(None, 2, 10, 8, 1000 + 80, 1000, torch.device("cpu"))


def test_runtime_places_by_the_sidecar_profile(calibrated_checkpoint, load_calibrated):
    model = load_calibrated(calibrated_checkpoint)
    c = model.config
    nb = neuron_bytes(model)
    assert nb == 2 * c.hidden_size * 4  # non-gated fp32: gate row + down column
    sidecar = Sidecar.load(calibrated_checkpoint)
    predictor_bytes = sum(
        t.numel() * 4
        for k, t in sidecar.tensors.items()
        if k.startswith("predictor.") and k != "predictor.score_threshold"
    )
    dense = dense_bytes(model, 2, 64, predictor_bytes)
    k = 100
    config = SparsityConfig(mode="predicted", gpu_memory=dense + k * nb)
    runtime = SparseRuntime.from_checkpoint(model, calibrated_checkpoint, config, max_batch=2, max_seq=64)
    p = runtime.placement
    assert p is not None and sum(h.numel() for h in p.hot) == k
    assert runtime.crossover == 1.0  # engine.hybrid.DEFAULT_CROSSOVER: a CPU tier never falls back
    freq = sidecar.tensors["profile.frequency"]
    chosen = torch.zeros_like(freq, dtype=torch.bool)
    for li, ids in enumerate(p.hot):
        chosen[li, ids] = True
    assert float(freq[chosen].min()) >= float(freq[~chosen].max())
    # The executors hold exactly those neurons in their hot tier.
    for li, layer in enumerate(model.layers):
        assert torch.equal(layer.mlp.tiered.hot_mask.nonzero().flatten(), p.hot[li])
