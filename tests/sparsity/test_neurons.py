"""The active-neuron definition against the literal one: ‖n_i(x)‖₂ ≥ ε, the vector n_i = h_i·W_out[:, i]."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from sparseinfer.sparsity.neurons import active_mask, output_magnitudes, output_norms


def test_output_norms_are_column_norms_in_float32() -> None:
    ffn = nn.Module()
    ffn.down_proj = nn.Linear(6, 3, bias=False).to(torch.bfloat16)  # W_out (d=3, m=6)
    norms = output_norms(ffn)
    assert norms.dtype == torch.float32 and norms.shape == (6,)
    w = ffn.down_proj.weight.detach().double()
    expected = [sum(float(w[r, i]) ** 2 for r in range(3)) ** 0.5 for i in range(6)]
    torch.testing.assert_close(norms, torch.tensor(expected, dtype=torch.float32))


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000), t=st.integers(1, 4), m=st.integers(1, 8), d=st.integers(1, 5))
def test_active_mask_matches_vector_norm_of_each_neuron_output(seed: int, t: int, m: int, d: int) -> None:
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(t, m, generator=g, dtype=torch.float64)
    w = torch.randn(d, m, generator=g, dtype=torch.float64)
    norms = torch.linalg.vector_norm(w, dim=0).float()
    mags = output_magnitudes(h, norms)
    eps = float(torch.rand(1, generator=g)) * 2
    mask = active_mask(h, norms, eps)
    for tok in range(t):
        for i in range(m):
            n_i = h[tok, i] * w[:, i]  # the neuron's output vector
            exact = float(torch.linalg.vector_norm(n_i))
            assert abs(float(mags[tok, i]) - exact) <= 1e-5 * max(1.0, exact)
            if abs(exact - eps) > 1e-5:  # away from float32 rounding at the boundary
                assert bool(mask[tok, i]) == (exact >= eps)


def test_equality_counts_as_active_and_per_neuron_eps_broadcasts() -> None:
    h = torch.tensor([[1.0, -2.0, 0.0]])
    norms = torch.tensor([1.0, 1.0, 1.0])
    assert active_mask(h, norms, 1.0).tolist() == [[True, True, False]]
    assert active_mask(h, norms, 0.0).tolist() == [[True, True, True]]  # ε = 0 keeps every neuron
    assert active_mask(h, norms, torch.tensor([2.0, 2.0, 0.0])).tolist() == [[False, True, True]]
