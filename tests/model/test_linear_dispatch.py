"""model.linear: half-precision CPU projections through the row kernels, everything else through F.linear."""

import pytest
import torch
import torch.nn.functional as F

from sparseinfer.model import linear as lin


@pytest.mark.parametrize("choice", ["rows", "torch"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_matches_fp32_reference(choice, dtype):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 77, generator=gen).to(dtype)
    w = (torch.randn(41, 77, generator=gen) / 77**0.5).to(dtype)
    b = torch.randn(41, generator=gen).to(dtype)
    got = lin.linear(x, w, b, rows_up_to=lin.EVERY_INPUT if choice == "rows" else 0)
    want = F.linear(x.float(), w.float(), b.float())
    assert got.shape == (3, 5, 41) and got.dtype == dtype
    torch.testing.assert_close(got.float(), want, rtol=2e-2, atol=2e-2)


def test_rows_path_is_taken_and_batch_independent(monkeypatch):
    calls = []
    real = lin.ops.linear
    monkeypatch.setattr(lin.ops, "linear", lambda *a: calls.append(1) or real(*a))
    x, w = torch.randn(9, 64).bfloat16(), torch.randn(30, 64).bfloat16()
    batch = lin.linear(x, w, rows_up_to=lin.EVERY_INPUT)
    one = [lin.linear(x[i : i + 1], w, rows_up_to=lin.EVERY_INPUT) for i in range(9)]
    assert calls and all(torch.equal(batch[i : i + 1], one[i]) for i in range(9))


def test_fp32_and_autograd_stay_on_torch(monkeypatch):
    monkeypatch.setattr(lin.ops, "linear", lambda *a: pytest.fail("row kernels used"))
    lin.linear(torch.randn(2, 8), torch.randn(4, 8), rows_up_to=lin.EVERY_INPUT)  # fp32
    layer = lin.Linear(8, 4).bfloat16()  # parameters require grad: training must get gradients
    lin.use_row_kernels(layer, "rows")
    layer(torch.randn(2, 8).bfloat16()).float().sum().backward()
    assert layer.weight.grad is not None


def test_module_keeps_nn_linear_parameters():
    assert set(lin.Linear(8, 4).state_dict()) == set(torch.nn.Linear(8, 4).state_dict()) == {"weight", "bias"}


def test_rejects_unknown_choice():
    with pytest.raises(ValueError, match="dense linear kernel must be one of auto, torch, rows or a number"):
        lin.use_row_kernels(lin.Linear(8, 4), "fast")
    from sparseinfer.cli import UsageError, read_environment

    with pytest.raises(UsageError, match="SPARSEINFER_DENSE_LINEAR"):
        read_environment({"SPARSEINFER_DENSE_LINEAR": "fast"})
    assert read_environment({"SPARSEINFER_DENSE_LINEAR": " 6 "}).dense_linear == "6"


def test_the_choice_is_made_once_at_load(tiny_random_checkpoint, monkeypatch):
    from sparseinfer.model import load_model

    for choice, up_to in (("rows", lin.EVERY_INPUT), ("torch", 0), ("5", 5)):
        model = load_model(tiny_random_checkpoint, dtype=torch.bfloat16, dense_linear=choice)
        assert {m.rows_up_to for m in model.modules() if isinstance(m, lin.Linear)} == {up_to}
    monkeypatch.setenv("SPARSEINFER_DENSE_LINEAR", "rows")  # nothing below the CLI reads it
    model = load_model(tiny_random_checkpoint, dtype=torch.bfloat16, dense_linear="torch")
    assert not any(m.rows_up_to for m in model.modules() if isinstance(m, lin.Linear))


def test_inputs_longer_than_rows_up_to_go_to_torch(monkeypatch):
    calls = []
    real = lin.ops.linear
    monkeypatch.setattr(lin.ops, "linear", lambda *a: calls.append(a[0].shape[0]) or real(*a))
    w = torch.randn(30, 64).bfloat16()
    for n in (1, 2, 3, 8):
        want = F.linear(torch.ones(n, 64).bfloat16().float(), w.float())
        got = lin.linear(torch.ones(n, 64).bfloat16(), w, rows_up_to=2).float()
        torch.testing.assert_close(got, want, rtol=1e-2, atol=1e-2)  # bf16 output
    assert calls == [1, 2]
    calls.clear()
    lin.linear(torch.ones(2, 3, 64).bfloat16(), w, rows_up_to=2)  # (B, T, d): 6 rows
    assert calls == []
