"""oracle_truncation on a real tiny model: dropping the neurons the oracle marks inactive changes each FFN's
output by exactly the CETT it reports, and the recorded sparsity is the share of inactive (token, neuron)
pairs."""

from __future__ import annotations

import pytest
import torch

from sparseinfer.sparsity.calibrate import calibrate, token_cett
from sparseinfer.sparsity.masking import oracle_truncation
from sparseinfer.sparsity.neurons import output_norms


@pytest.mark.parametrize("target", [0.1, 0.3])
def test_truncation_error_equals_reported_cett(tiny_model, calibration_sequences, target: float) -> None:
    seqs = calibration_sequences[:4]
    cal = calibrate(tiny_model, seqs, target, num_candidates=100, progress=False)
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    handles = [
        layer.mlp.register_forward_hook(lambda mod, args, out: seen.append((args[0].detach(), out.detach())))
        for layer in tiny_model.layers
    ]
    try:
        with torch.no_grad(), oracle_truncation(tiny_model, cal.thresholds) as stats:
            tiny_model(seqs)
    finally:
        for handle in handles:
            handle.remove()
    assert len(seen) == len(tiny_model.layers)
    for li, (x, y_trunc) in enumerate(seen):
        ffn = tiny_model.layers[li].mlp
        h = ffn.neuron_activations(x).reshape(-1, ffn.down_proj.weight.shape[1])  # (N, m), hooks off now
        y_full = h @ ffn.down_proj.weight.T  # (N, d): Σ_i n_i, no neuron dropped
        diff = torch.linalg.vector_norm(y_full - y_trunc.reshape(y_full.shape), dim=-1)
        rel = diff / torch.linalg.vector_norm(y_full, dim=-1)
        eps = float(cal.thresholds[li])
        reported = token_cett(h, ffn.down_proj.weight, output_norms(ffn), eps)
        torch.testing.assert_close(rel, reported, rtol=1e-4, atol=1e-5)
        mags = h.abs() * ffn.down_proj.weight.norm(dim=0)
        assert stats.layer_sparsity()[li] == pytest.approx(float((mags < eps).float().mean()), abs=1e-9)
        assert stats.tokens[li] == seqs.numel()
    # layer 0 sees the dense model's inputs, so its truncated CETT is calibration's own figure
    ffn0 = tiny_model.layers[0].mlp
    h0 = ffn0.neuron_activations(seen[0][0]).reshape(-1, 256)
    assert float(
        token_cett(h0, ffn0.down_proj.weight, output_norms(ffn0), float(cal.thresholds[0])).mean()
    ) == (pytest.approx(cal.cett_per_layer[0], rel=1e-4))
    assert stats.sparsity() == pytest.approx(sum(stats.layer_sparsity()) / len(tiny_model.layers))


def test_hooks_are_removed_and_zero_thresholds_change_nothing(tiny_model, calibration_sequences) -> None:
    seqs = calibration_sequences[:2]
    with torch.no_grad():
        dense = tiny_model(seqs)
        with oracle_truncation(tiny_model, torch.zeros(len(tiny_model.layers))) as stats:
            same = tiny_model(seqs)
        with oracle_truncation(tiny_model, torch.full((len(tiny_model.layers),), 1e9)):
            cut = tiny_model(seqs)
        after = tiny_model(seqs)
    torch.testing.assert_close(same, dense)
    assert stats.sparsity() == 0.0
    assert not torch.allclose(cut, dense)
    torch.testing.assert_close(after, dense)
    with (
        pytest.raises(ValueError, match="thresholds has 3 entries"),
        oracle_truncation(tiny_model, [0.1, 0.2, 0.3]),
    ):
        pass
