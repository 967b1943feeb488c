"""Sparsity modes end to end: oracle == the study's truncated model, a perfect predictor == oracle, hybrid ==
single tier, batch independence, per-request accounting against brute force, and the errors."""

from __future__ import annotations

import pytest
import torch

from sparseinfer.cli import main
from sparseinfer.engine.generate import Engine
from sparseinfer.engine.modes import SparseRuntime, SparsityConfig
from sparseinfer.engine.placement import dense_bytes, neuron_bytes
from sparseinfer.engine.sampling import SamplingParams
from sparseinfer.model import load_tokenizer
from sparseinfer.sparsity.masking import oracle_truncation
from sparseinfer.sparsity.neurons import active_mask, output_norms
from sparseinfer.sparsity.sidecar import Sidecar, SidecarError

GREEDY = SamplingParams(max_new_tokens=6, temperature=0.0, ignore_eos=True)


def tokens(n=12, seed=0, vocab=512):
    return torch.randint(2, vocab, (2, n), generator=torch.Generator().manual_seed(seed))


def runtime(model, path, mode, **kw):
    return SparseRuntime.from_checkpoint(
        model, path, SparsityConfig(mode=mode, **kw), max_batch=4, max_seq=64
    )


def test_oracle_mode_equals_the_truncated_model(calibrated_checkpoint, load_calibrated):
    reference = load_calibrated(calibrated_checkpoint)
    x = tokens()
    with oracle_truncation(reference, Sidecar.load(calibrated_checkpoint).thresholds):
        expected = reference(x)  # (2, 12, V)
    model = load_calibrated(calibrated_checkpoint)
    runtime(model, calibrated_checkpoint, "oracle")
    torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(expected, reference(x), atol=1e-3)  # the truncation does change the model


class PerfectPredictor:
    """Scores a neuron +1 when it is truly active and -1 otherwise (from the layer's dense FFN)."""

    def __init__(self, ffn, eps):
        self.ffn, self.norms, self.eps = ffn, output_norms(ffn), eps
        self.threshold = 0.0

    def scores(self, x):
        keep = active_mask(self.ffn.neuron_activations(x), self.norms, self.eps)
        return keep.float() * 2 - 1

    def to(self, device, dtype, hugepages=True, weights="checkpoint", rows_up_to=0):
        return self

    numel = 0


def test_predicted_mode_with_a_perfect_predictor_equals_oracle(calibrated_checkpoint, load_calibrated):
    thresholds = Sidecar.load(calibrated_checkpoint).thresholds
    oracle = load_calibrated(calibrated_checkpoint)
    runtime(oracle, calibrated_checkpoint, "oracle")
    model = load_calibrated(calibrated_checkpoint)
    perfect = [PerfectPredictor(layer.mlp, float(thresholds[i])) for i, layer in enumerate(model.layers)]
    SparseRuntime(model, SparsityConfig(mode="predicted"), thresholds, perfect, None)
    x = tokens(seed=1)
    torch.testing.assert_close(model(x), oracle(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("share", ["zero", "partial", "all"])
def test_hybrid_placement_equals_single_tier(calibrated_checkpoint, load_calibrated, share):
    single = load_calibrated(calibrated_checkpoint)
    runtime(single, calibrated_checkpoint, "predicted")
    model = load_calibrated(calibrated_checkpoint)
    nb, L, m = neuron_bytes(model), model.config.num_layers, model.config.intermediate_size
    tensors = Sidecar.load(calibrated_checkpoint).section_tensors("predictor")
    predictor_bytes = sum(t.numel() * 4 for k, t in tensors.items() if k != "predictor.score_threshold")
    dense = dense_bytes(model, 4, 64, predictor_bytes)
    budget = {"zero": 0, "partial": dense + (L * m // 3) * nb, "all": dense + L * m * nb}[share]
    rt = runtime(model, calibrated_checkpoint, "predicted", gpu_memory=budget)
    hot = sum(int(h.numel()) for h in rt.placement.hot)
    assert hot == {"zero": 0, "partial": L * m // 3, "all": L * m}[share]
    x = tokens(seed=2)
    torch.testing.assert_close(model(x), single(x), rtol=1e-5, atol=1e-5)
    # And the accounting splits the computed neurons between the tiers accordingly.
    gen = Engine(model, load_tokenizer(calibrated_checkpoint), max_batch=1, max_seq=64, sparsity=rt)
    seq = gen.start([5, 6, 7], GREEDY)
    assert seq.sparsity.report().tokens == 0
    list(gen.stream(seq))
    r = seq.sparsity.report()
    if share == "zero":
        assert r.hot_share == 0.0 and r.cold_share == 1.0
    elif share == "all":
        assert r.hot_share == 1.0
    else:
        assert 0.0 < r.hot_share < 1.0 and r.hot_share + r.cold_share == pytest.approx(1.0)


def test_batch_independence_across_mixed_modes(calibrated_checkpoint, load_calibrated):
    model = load_calibrated(calibrated_checkpoint)
    rt = runtime(model, calibrated_checkpoint, "predicted", measure_truth=False)
    gen = Engine(model, load_tokenizer(calibrated_checkpoint), max_batch=4, max_seq=64, sparsity=rt)
    prompts = [[3, 4, 5, 6], [7, 8, 9], [10, 11, 12, 13, 14], [15, 16]]
    modes = ["oracle", "predicted", "dense", None]
    params = [SamplingParams(max_new_tokens=6, temperature=0.8, seed=i, ignore_eos=True) for i in range(4)]
    alone = [gen.generate(p, sp, sparsity_mode=mo) for p, sp, mo in zip(prompts, params, modes, strict=True)]
    together = gen.generate_batch(prompts, params, sparsity_modes=modes)
    for a, b in zip(alone, together, strict=True):
        assert a.token_ids == b.token_ids


def test_accounting_matches_brute_force_in_oracle_mode(calibrated_checkpoint, load_calibrated):
    """computed/true shares from the engine == the truncated model's own counts over the same tokens."""
    model = load_calibrated(calibrated_checkpoint)
    rt = runtime(model, calibrated_checkpoint, "oracle")
    gen = Engine(model, load_tokenizer(calibrated_checkpoint), max_batch=1, max_seq=64, sparsity=rt)
    prompt = [3, 14, 15, 92, 65]
    seq = gen.start(prompt, GREEDY)
    list(gen.stream(seq))
    report = seq.sparsity.report()
    fed = prompt + seq.output_ids[:-1]  # the last sampled token is never fed through the model
    assert report.mode == "oracle" and report.tokens == len(fed)

    reference = load_calibrated(calibrated_checkpoint)
    with oracle_truncation(reference, Sidecar.load(calibrated_checkpoint).thresholds) as stats:
        reference(torch.tensor([fed]))
    m, L = model.config.intermediate_size, model.config.num_layers
    for li, layer in enumerate(report.layers):
        share = stats.active[li] / (len(fed) * m)
        assert layer.predicted_active_share == pytest.approx(share)
        assert layer.true_active_share == pytest.approx(share) and layer.recall == 1.0
    assert report.computed_share == pytest.approx(sum(stats.active) / (len(fed) * m * L))
    steps = 1 + (len(seq.output_ids) - 1)  # one prefill + one decode step per further token
    assert report.ffn_bytes_dense == steps * L * m * neuron_bytes(reference)
    assert report.hot_share == 0.0 and report.cold_share == 1.0  # no placement, CPU model: CPU tier


def test_predicted_mode_measures_truth_and_recall_when_asked(calibrated_checkpoint, load_calibrated):
    """With measure_truth: true share and recall == brute force over the FFN inputs the engine saw."""
    model = load_calibrated(calibrated_checkpoint)
    dense = load_calibrated(calibrated_checkpoint)  # the dense FFNs, for the brute-force truth
    rt = runtime(model, calibrated_checkpoint, "predicted", measure_truth=True)
    seen = {li: [] for li in range(len(model.layers))}
    for li, layer in enumerate(model.layers):
        layer.mlp.register_forward_pre_hook(
            lambda mod, args, li=li: seen[li].append(args[0].reshape(-1, args[0].shape[-1]))
        )
    gen = Engine(model, load_tokenizer(calibrated_checkpoint), max_batch=1, max_seq=64, sparsity=rt)
    seq = gen.start([3, 14, 15], GREEDY)
    list(gen.stream(seq))
    report = seq.sparsity.report()
    thresholds = Sidecar.load(calibrated_checkpoint).thresholds
    m = model.config.intermediate_size
    for li, layer in enumerate(report.layers):
        x = torch.cat(seen[li])  # (tokens, d)
        ffn = dense.layers[li].mlp
        truth = active_mask(ffn.neuron_activations(x), output_norms(ffn), float(thresholds[li]))
        predictor = model.layers[li].mlp.predictor
        chosen = predictor.scores(x) > predictor.threshold
        assert layer.true_active_share == pytest.approx(float(truth.sum()) / (x.shape[0] * m))
        assert layer.recall == pytest.approx(float((truth & chosen).sum()) / float(truth.sum()))
        assert layer.predicted_active_share == pytest.approx(float(chosen.sum()) / (x.shape[0] * m))
    assert report.tokens == 3 + len(seq.output_ids) - 1
    # Without the truth, the batch-1 decode steps take the cheap counting path: same selected counts.
    rt.measure_truth = False
    again = gen.start([3, 14, 15], GREEDY)
    list(gen.stream(again))
    plain = again.sparsity.report()
    assert again.output_ids == seq.output_ids
    for a, b in zip(plain.layers, report.layers, strict=True):
        assert a.predicted_active_share == pytest.approx(b.predicted_active_share) and a.recall is None
    assert (plain.ffn_bytes_read, plain.computed_share) == (report.ffn_bytes_read, report.computed_share)


def test_missing_sidecar_sections_name_the_command(
    calibration_only_checkpoint, tiny_random_checkpoint, load_calibrated
):
    with pytest.raises(SidecarError, match="sparseinfer train-predictor"):
        runtime(load_calibrated(calibration_only_checkpoint), calibration_only_checkpoint, "predicted")
    with pytest.raises(SidecarError, match="sparseinfer calibrate"):
        runtime(load_calibrated(tiny_random_checkpoint), tiny_random_checkpoint, "oracle")
    # A per-request override to a mode the sidecar cannot serve is refused at start, naming the command.
    model = load_calibrated(calibration_only_checkpoint)
    rt = runtime(model, calibration_only_checkpoint, "oracle")
    gen = Engine(model, load_tokenizer(calibration_only_checkpoint), max_batch=1, max_seq=64, sparsity=rt)
    with pytest.raises(SidecarError, match="train-predictor"):
        gen.start([3, 4], GREEDY, sparsity_mode="predicted")
    with pytest.raises(ValueError, match="sparsity mode must be one of"):
        gen.start([3, 4], GREEDY, sparsity_mode="fast")
    plain = Engine(load_calibrated(calibration_only_checkpoint), load_tokenizer(calibration_only_checkpoint))
    with pytest.raises(ValueError, match="runs the model dense"):
        plain.start([3, 4], GREEDY, sparsity_mode="oracle")


def test_dense_generator_counts_every_neuron(calibrated_checkpoint, load_calibrated):
    model = load_calibrated(calibrated_checkpoint)
    gen = Engine(model, load_tokenizer(calibrated_checkpoint), max_batch=1, max_seq=64)
    seq = gen.start([3, 4, 5], GREEDY)
    list(gen.stream(seq))
    r = seq.sparsity.report()
    assert r.mode == "dense" and r.computed_share == 1.0 and r.ffn_bytes_read == r.ffn_bytes_dense
    assert r.tokens == 3 + len(seq.output_ids) - 1


def test_cli_generate_with_sparsity_and_bad_gpu_memory(calibrated_checkpoint, capsys):
    argv = [
        "generate",
        "--model",
        str(calibrated_checkpoint),
        "--prompt",
        "the model",
        "--max-new-tokens",
        "4",
    ]
    assert main([*argv, "--sparsity", "oracle", "--gpu-memory", "0"]) == 0
    err = capsys.readouterr().err
    assert "sparsity: oracle (computed" in err and "cold 100.0%" in err
    assert main([*argv, "--gpu-memory", "4 lots"]) == 2
    assert "--gpu-memory" in capsys.readouterr().err


def test_cli_generate_without_the_sidecar_section_names_the_command(tiny_random_checkpoint, capsys):
    argv = ["generate", "--model", str(tiny_random_checkpoint), "--prompt", "hi", "--sparsity", "predicted"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "--sparsity predicted" in err and "sparseinfer calibrate" in err
