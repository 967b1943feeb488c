"""model.linear_calibration: the measured choice between our row kernels and torch, its cache, and how
model.linear.use_row_kernels applies it (the timings faked where the logic is under test, real where the
measurement is)."""

import json
import math

import pytest
import torch

from sparseinfer.model import linear as lin
from sparseinfer.model import linear_calibration as lc


def fake_timer(torch_wins_from, calls=None, noisy=()):
    """Seconds where torch wins from ``torch_wins_from`` rows on (None: never); at a rung in ``noisy`` the
    first measurement of our kernels was slowed (by something else on the machine) enough to lose."""
    seen = set()

    def timer(weights, n):
        if calls is not None:
            calls.append((tuple(weights[0].shape), len(weights), n))
        torch_wins = torch_wins_from is not None and n >= torch_wins_from
        slowed = n in noisy and n not in seen
        seen.add(n)
        return {"rows": 2.0 * n + (3 if slowed else 0), "torch": 2.0 * n + (-1 if torch_wins else 1)}

    return timer


W = [torch.zeros(64, 32, dtype=torch.bfloat16)]


@pytest.mark.parametrize(
    ("torch_wins_from", "want"), [(4, 3), (6, 4), (1, 0), (64, 48), (None, lc.EVERY_INPUT)]
)
def test_rows_up_to_is_the_last_rung_before_torch_wins(torch_wins_from, want):
    calls = []
    entry = lc.choose(W, fake_timer(torch_wins_from, calls))
    assert entry["rows_up_to"] == want
    if torch_wins_from is None:
        assert [n for *_, n in calls] == list(lc.LADDER)
    else:  # the losing rung measured twice (a confirmation), nothing above it
        assert [n for *_, n in calls][-2:] == [torch_wins_from, torch_wins_from]
        assert max(n for *_, n in calls) == torch_wins_from
    assert set(entry["seconds [rows, torch]"]) == {str(n) for *_, n in calls}


def test_one_noisy_measurement_does_not_decide():
    assert lc.choose(W, fake_timer(12, noisy=(3,)))["rows_up_to"] == 8


def test_the_choice_is_cached_per_machine_and_shape(tmp_path, monkeypatch):
    path = tmp_path / "cache" / "dense-linear.json"
    calls = []
    first = lc.Calibration(path, fake_timer(4, calls))
    assert first.rows_up_to(W) == 3 and calls
    calls.clear()
    assert first.rows_up_to(W) == 3 and not calls  # in memory
    again = lc.Calibration(path, fake_timer(None, calls))  # a later process: reads the file
    assert again.rows_up_to(W) == 3 and not calls
    other = [torch.zeros(16, 32, dtype=torch.bfloat16)]
    assert again.rows_up_to(other) == lc.EVERY_INPUT and calls  # a new shape is measured
    data = json.loads(path.read_text())
    assert set(data[lc.machine_key()]) == {"bfloat16:64x32", "bfloat16:16x32"}

    monkeypatch.setattr(lc, "machine_key", lambda: "another machine")
    calls.clear()
    assert lc.Calibration(path, fake_timer(2, calls)).rows_up_to(W) == 1 and calls
    assert len(json.loads(path.read_text())) == 2  # both machines kept


def test_thread_count_is_part_of_the_key():
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = lc.machine_key()
        torch.set_num_threads(2)
        assert lc.machine_key() != one and "2 threads" in lc.machine_key()
    finally:
        torch.set_num_threads(threads)


def test_a_corrupt_or_unwritable_cache_costs_a_measurement_not_a_load(tmp_path, caplog):
    path = tmp_path / "dense-linear.json"
    path.write_text("{not json")
    assert lc.Calibration(path, fake_timer(3)).rows_up_to(W) == 2
    assert "ignoring the calibration cache" in caplog.text
    assert json.loads(path.read_text())[lc.machine_key()]["bfloat16:64x32"]["rows_up_to"] == 2
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert lc.Calibration(blocker / "dense-linear.json", fake_timer(3)).rows_up_to(W) == 2
    assert "could not write" in caplog.text


def test_measure_times_both_kernels_on_streamed_weights_then_on_a_slice(monkeypatch):
    seen = {name: [] for name in lc.KERNELS}
    for name, kernel in list(lc.KERNELS.items()):
        monkeypatch.setitem(
            lc.KERNELS, name, lambda x, w, k=kernel, n=name: seen[n].append((x.shape[0], w.shape)) or k(x, w)
        )
    monkeypatch.setattr(lc, "STREAM_BYTES", 3 * 64 * 32 * 2)  # three of the weights below
    monkeypatch.setattr(lc, "SLICE_MACS", 16 * 32 * 10)  # ten rows at 16 input rows
    weights = [torch.randn(64, 32).bfloat16() for _ in range(5)]
    for n, timed_shape, per_pass in ((1, (64, 32), 3), (16, (10, 32), 1)):
        for s in seen.values():
            s.clear()
        t = lc.measure(weights, n)
        assert set(t) == {"rows", "torch"} and all(0 < v < math.inf for v in t.values())
        for s in seen.values():  # one warm-up call, then REPEATS passes
            assert len(s) == 1 + lc.REPEATS * per_pass and all(c == (n, timed_shape) for c in s)


def test_real_calibration_of_a_small_shape(tmp_path):
    """Unfaked: whatever it picks is a rung of the ladder (or every input) and is what the file says."""
    path = tmp_path / "dense-linear.json"
    up_to = lc.Calibration(path).rows_up_to([torch.randn(256, 128).bfloat16() for _ in range(2)])
    assert up_to in (0, lc.EVERY_INPUT, *lc.LADDER)
    entry = json.loads(path.read_text())[lc.machine_key()]["bfloat16:256x128"]
    assert entry["rows_up_to"] == up_to
    assert all(r > 0 and t > 0 for r, t in entry["seconds [rows, torch]"].values())


def test_use_row_kernels_calibrates_each_shape_once_over_all_its_layers(
    tiny_random_checkpoint, tmp_path, monkeypatch
):
    from sparseinfer.model import load_model

    calls = []
    monkeypatch.setattr(lin, "calibration", lambda: lc.Calibration(tmp_path / "c.json", fake_timer(4, calls)))
    model = load_model(tiny_random_checkpoint, dtype=torch.bfloat16, dense_linear=None)
    assert not any(m.rows_up_to for m in model.modules() if isinstance(m, lin.Linear))  # not chosen yet
    chosen = lin.use_row_kernels(model, "auto")
    linears = [m for m in model.modules() if isinstance(m, lin.Linear)]
    shapes = {tuple(m.weight.shape) for m in linears}
    assert chosen == {f"cpu:bfloat16:{a}x{b}": 3 for a, b in shapes}
    assert all(m.rows_up_to == 3 for m in linears)
    layers = model.config.num_layers
    counts = {shape: count for shape, count, _ in calls}
    assert set(counts) == shapes and counts[tuple(model.layers[0].mlp.down_proj.weight.shape)] == layers

    calls.clear()
    fp32 = load_model(tiny_random_checkpoint, dtype=torch.float32, dense_linear="auto")
    assert not calls and not any(m.rows_up_to for m in fp32.modules() if isinstance(m, lin.Linear))
