"""`bench llamacpp`'s pieces that run without llama.cpp: the SiLU twin checkpoint and the report, whose every
figure must come from the result JSON (the ratios and GB/s recomputed here from the same numbers)."""

from __future__ import annotations

import io
import json

import pytest

from sparseinfer.bench.llamacpp import LlamaCppBenchConfig, _llama_bench, silu_twin
from sparseinfer.bench.llamacpp_report import format_table
from sparseinfer.bench.llamacpp_tools import LlamaBenchCrashed


def test_silu_twin_links_the_weights_and_changes_only_the_activation(tmp_path):
    src = tmp_path / "ck"
    src.mkdir()
    config = {"hidden_act": "fatrelu", "hidden_act_param": 1.5, "hidden_size": 8}
    (src / "config.json").write_text(json.dumps(config))
    (src / "model.safetensors").write_bytes(b"weights")
    (src / "tokenizer.json").write_text("{}")
    (src / "sparsity.json").write_text("{}")  # a sidecar made for FATReLU must not follow
    twin = silu_twin(src)
    assert json.loads((twin / "config.json").read_text()) == {"hidden_act": "silu", "hidden_size": 8}
    assert (twin / "model.safetensors").resolve() == (src / "model.safetensors").resolve()
    assert (twin / "tokenizer.json").is_file() and not (twin / "sparsity.json").exists()
    assert silu_twin(src) == twin  # a second run reuses it


def _result():
    rounds = {"bandwidth": [30.0, 32.0]}
    per = {
        "llama.cpp/{}/decode": (10.0, 12.0),
        "ours/{}/dense-silu/decode": (11.0, 12.0),
        "ours/{}/dense/decode": (15.0, 18.0),
        "ours/{}/predicted/decode": (20.0, 24.0),
        "llama.cpp/{}/prefill": (80.0, 80.0),
        "ours/{}/dense-silu/prefill": (60.0, 70.0),
        "ours/{}/dense/prefill": (61.0, 71.0),
        "ours/{}/predicted/prefill": (75.0, 85.0),
    }
    for key, values in per.items():
        rounds[key.format("bf16")] = list(values)
    parts = {"embedding": 100, "dense": 1_000_000_000, "ffn": 2_000_000_000, "predictors": 50_000_000}
    cfg = LlamaCppBenchConfig(formats=("bf16",), rounds=2)
    return {
        "meta": {
            "date": "2026-12-02",
            "torch": "2.13.0",
            "cpu": "test CPU",
            "cpu_flags": ["avx2", "fma"],
            "threads": 2,
            "llama_cpp": {"version": "0.3.36"},
            "config": {**cfg.__dict__, "checkpoint": None, "llama_cpp": None, "cache": None},
        },
        "rounds": rounds,
        "reports": {"bf16/predicted": {"ffn_bytes_read": 1, "ffn_bytes_dense": 10}},
        "memory": {"bf16": {"resident_bytes": 3_300_000_000, "weight_bytes": parts, "kv_cache_bytes": 10**8}},
        "extras": {
            "bf16": {
                "projections_gbps": {"attention (q/k/v)": 24.0, "lm_head": 27.0},
                "read_gbps": 30.0,
                "batches": {"4": {"dense": 40.0, "predicted": 50.0}},
            }
        },
    }


def test_report_figures_come_from_the_result():
    table = format_table(_result())
    assert "flags: avx2, fma" in table and "median 31.0 GB/s" in table
    # decode: medians, then per-round ratios: silu 11/10, 12/12 -> 1.05; predicted 2.0, 2.0
    silu_bytes = 1_000_000_000 + 2_000_000_000
    predicted_bytes = 1_000_000_000 + 2_000_000_000 * 0.1 + 50_000_000
    row = (
        f"| bf16 | 11.00 | 11.50 | 16.50 | 22.00 | 1.05× | 1.50× | 2.00× | {silu_bytes * 11.5 / 1e9:.1f} | "
        f"{predicted_bytes * 22.0 / 1e9:.1f} |"
    )
    assert row in table
    assert "| bf16 | 80.0 | 65.0 | 66.0 | 80.0 | 0.81× | 1.00× |" in table  # prefill: 60/80, 70/80 -> 0.8125
    assert "| bf16 | 30.0 | 24.0 (80%) | 27.0 (90%) |" in table
    assert "| bf16 | 4 | 40.0 | 50.0 | 1.25× |" in table
    weights = sum(_result()["memory"]["bf16"]["weight_bytes"].values())
    assert f"{3_300_000_000 / weights:.2f} | {3_300_000_000 / (weights + 10**8):.2f} |" in table


def test_report_leaves_out_the_batch_table_when_no_batch_ran():
    result = _result()
    assert "Decode at batch > 1" in format_table(result)
    result["extras"]["bf16"]["batches"] = {}  # --batches ""
    assert "Decode at batch > 1" not in format_table(result)


@pytest.mark.parametrize("formats", [(), ("fp8",)])
def test_config_refuses_unknown_formats(formats):
    with pytest.raises(ValueError, match="--formats"):
        LlamaCppBenchConfig(formats=formats).validate()


class _CrashingWithRepack:
    """llama-bench as on the Sapphire Rapids where its repacked quantized prefill segfaults."""

    def __init__(self):
        self.calls = []

    def bench(self, model, threads, prompt, generate, repack=True):
        self.calls.append((model.name, prompt, repack))
        if repack and prompt:
            raise LlamaBenchCrashed("llama-bench died of signal 11")
        return {"avg_ts": 100.0 if repack else 90.0}


def test_a_crash_with_repacking_is_measured_without_it_from_then_on(tmp_path):
    tools, no_repack, log = _CrashingWithRepack(), set(), io.StringIO()
    q8 = tmp_path / "model-Q8_0.gguf"
    assert _llama_bench(tools, q8, 2, 0, 32, no_repack, log) == 100.0  # decode works with repacking
    assert _llama_bench(tools, q8, 2, 128, 0, no_repack, log) == 90.0
    assert _llama_bench(tools, q8, 2, 128, 0, no_repack, log) == 90.0
    assert (
        tools.calls
        == [("model-Q8_0.gguf", 0, True), ("model-Q8_0.gguf", 128, True)]
        + [("model-Q8_0.gguf", 128, False)] * 2
    )
    assert no_repack == {"model-Q8_0.gguf pp"} and "--repack 0" in log.getvalue()
    result = _result()
    result["meta"]["llama_cpp_without_repack"] = sorted(no_repack)
    assert "crashed (SIGSEGV) with its weight repacking for model-Q8_0.gguf pp" in format_table(result)
    assert "SIGSEGV" not in format_table(_result())


def test_report_says_which_kernel_the_dense_projections_used():
    result = _result()
    assert "SPARSEINFER_DENSE_LINEAR" not in format_table(result)  # a result from before it was recorded
    result["meta"]["dense_linear"] = "auto"
    result["meta"]["dense_linear_rows_up_to"] = {"bfloat16:4096x4096": 4, "bfloat16:32000x4096": 2**31 - 1}
    table = format_table(result)
    assert "`SPARSEINFER_DENSE_LINEAR=auto`" in table
    assert "bfloat16:4096x4096 ≤ 4; bfloat16:32000x4096 any." in table


def test_report_gives_the_measured_ffn_crossover_costs():
    result = _result()
    assert "Batched FFN steps" not in format_table(result)  # a result from before it was recorded
    entry = {"per_neuron": 7e-7, "per_pair": 2.5e-7, "gemm_rows": [8, 128], "gemm_per_neuron": [2e-6, 8.5e-6]}
    result["meta"]["ffn_crossover"] = {"ffn:bfloat16:11008x4096:gated:silu:rows>4": entry}
    table = format_table(result)
    assert "| ffn:bfloat16:11008x4096:gated:silu:rows>4 | 0.70 | 0.250 | 8: 2.00, 128: 8.50 |" in table
