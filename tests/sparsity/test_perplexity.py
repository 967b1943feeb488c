"""Perplexity against Hugging Face's loss (an independent implementation), and the predicted-mask execution
against brute-force FFNs and the oracle mask."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from sparseinfer.model import load_model
from sparseinfer.sparsity.masking import oracle_truncation
from sparseinfer.sparsity.neurons import active_mask, output_norms
from sparseinfer.sparsity.perplexity import perplexity, predicted_truncation


@pytest.mark.parametrize("hidden_act", ["silu", "relu2"])
def test_perplexity_matches_transformers_loss(make_hf_checkpoint, hidden_act: str) -> None:
    import transformers

    path = make_hf_checkpoint(hidden_act=hidden_act, seed=3)
    hf = transformers.AutoModelForCausalLM.from_pretrained(path).eval()
    model = load_model(path, dtype=torch.float32).eval()
    tokens = torch.randint(0, 512, (5, 33), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        hf_loss = hf(tokens, labels=tokens).loss  # mean NLL over the 5 × 32 shifted positions
    # batch_size 2 splits the 5 sequences unevenly: the mean must still be over positions, not batches
    ours = perplexity(model, tokens, batch_size=2, progress=False)
    assert ours == pytest.approx(math.exp(float(hf_loss)), rel=1e-4)
    assert ours > 1.0


def test_perplexity_brute_force_per_position(tiny_model, calibration_sequences) -> None:
    seqs = calibration_sequences[:3, :20]
    nll = []
    with torch.no_grad():
        for s in seqs:
            for t in range(1, s.numel()):  # token t scored from the prefix s[:t], one forward per prefix
                logp = torch.log_softmax(tiny_model(s[None, :t])[0, -1].double(), -1)
                nll.append(-float(logp[s[t]]))
    expected = math.exp(sum(nll) / len(nll))
    assert perplexity(tiny_model, seqs, batch_size=3, progress=False) == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("bad", [torch.zeros(4, dtype=torch.long), torch.zeros(3, 1, dtype=torch.long)])
def test_perplexity_rejects_bad_shapes(tiny_model, bad) -> None:
    with pytest.raises(ValueError, match="sequences must be"):
        perplexity(tiny_model, bad, progress=False)


class _FixedPredictor:
    """Stand-in predictor set: predicts a fixed rule per layer from the FFN input x."""

    def __init__(self, model, rule) -> None:
        self.model, self.rule, self.calls = model, rule, []

    def __len__(self) -> int:
        return len(self.model.layers)

    def predict(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        self.calls.append((layer, tuple(x.shape)))
        return self.rule(layer, x)


def test_predicted_truncation_drops_exactly_the_predicted_neurons(tiny_model) -> None:
    torch.manual_seed(0)
    m = tiny_model.layers[0].mlp.down_proj.in_features
    keep = [torch.rand(m) < 0.3 for _ in tiny_model.layers]  # a fixed random subset per layer
    pred = _FixedPredictor(tiny_model, lambda layer, x: keep[layer].expand(*x.shape[:-1], m))
    ffn = tiny_model.layers[1].mlp
    x = torch.randn(2, 7, ffn.gate_proj.in_features)
    with torch.no_grad(), predicted_truncation(tiny_model, pred) as counts:
        got = ffn(x)
    # brute force: sum of the kept neurons' outputs n_i(x) = h_i W_out[:, i]
    h = ffn.neuron_activations(x)
    expected = sum(h[..., i : i + 1] * ffn.down_proj.weight[:, i] for i in range(m) if keep[1][i])
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    assert pred.calls == [(1, (2, 7, x.shape[-1]))]  # the predictor saw the FFN input, not h
    assert counts.active[1] == 14 * int(keep[1].sum()) and counts.tokens[1] == 14
    assert counts.layer_sparsity()[1] == pytest.approx(1 - int(keep[1].sum()) / m)
    # hooks are gone afterwards
    torch.testing.assert_close(ffn(x), ffn.down_proj(h))


def test_predicted_mask_equal_to_oracle_gives_oracle_perplexity(tiny_model, calibration_sequences) -> None:
    seqs = calibration_sequences[:4]
    eps = [0.05, 0.08]
    norms = [output_norms(layer.mlp) for layer in tiny_model.layers]

    def oracle_rule(layer: int, x: torch.Tensor) -> torch.Tensor:
        return active_mask(tiny_model.layers[layer].mlp.neuron_activations(x), norms[layer], eps[layer])

    with oracle_truncation(tiny_model, eps) as oracle_stats:
        oracle = perplexity(tiny_model, seqs, progress=False)
    with predicted_truncation(tiny_model, _FixedPredictor(tiny_model, oracle_rule)) as counts:
        predicted = perplexity(tiny_model, seqs, progress=False)
    dense = perplexity(tiny_model, seqs, progress=False)
    assert predicted == pytest.approx(oracle, rel=1e-6)
    assert counts.layer_sparsity() == pytest.approx(oracle_stats.layer_sparsity())
    assert min(counts.layer_sparsity()) > 0.1  # the thresholds really dropped neurons...
    assert predicted != pytest.approx(dense, rel=1e-6)  # ...and that changed the model


def test_predicted_truncation_rejects_wrong_layer_count(tiny_model) -> None:
    short = _FixedPredictor(SimpleNamespace(layers=[None]), lambda layer, x: x)  # a 1-layer model's
    with pytest.raises(ValueError, match="1 layers, the model 2"), predicted_truncation(tiny_model, short):
        pass
