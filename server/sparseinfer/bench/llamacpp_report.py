"""The markdown report of ``bench llamacpp`` (figures from its JSON; nothing typed by hand)."""

from __future__ import annotations

import statistics
from typing import Any

from sparseinfer.bench import engine_measure as em
from sparseinfer.model.linear_calibration import EVERY_INPUT


def _median(result: dict[str, Any], key: str) -> float | None:
    values = result["rounds"].get(key)
    return statistics.median(values) if values else None


def _f(value: float | None, digits: int) -> str:
    """A figure, or a dash where the run did not measure it (older results have no SiLU twin)."""
    return "—" if value is None else f"{value:.{digits}f}"


def _gib(nbytes: int | None) -> str:
    return "—" if not nbytes else f"{nbytes / 2**30:.2f} GiB"


def _x(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}×"


def _ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}×" if a and b else "—"


def _per_round_ratio(result: dict[str, Any], a: str, b: str) -> float | None:
    xs, ys = result["rounds"].get(a), result["rounds"].get(b)
    if not xs or not ys:
        return None
    return statistics.median(x / y for x, y in zip(xs, ys, strict=True))


def _without_repack(meta: dict[str, Any]) -> list[str]:
    runs = meta.get("llama_cpp_without_repack") or []
    if not runs:
        return []
    return [
        f"llama-bench crashed (SIGSEGV) with its weight repacking for {', '.join(runs)}: those were "
        "measured with `--repack 0` (llama.cpp's AMX / repacked quantized matmul on this CPU; "
        "ggml-org/llama.cpp#20824).",
        "",
    ]


def _dense_linear(meta: dict[str, Any]) -> list[str]:
    """Which kernel our unquantized dense projections used (``model.linear``): the calibration's choice."""
    chosen = meta.get("dense_linear_rows_up_to")
    if not chosen:  # a result from before the calibration was recorded
        return []
    shown = [f"{shape} {'any' if n == EVERY_INPUT else f'≤ {n}'}" for shape, n in chosen.items()]
    return [
        f"Our unquantized dense projections (`SPARSEINFER_DENSE_LINEAR={meta['dense_linear']}`; `auto`: "
        "calibrated on this machine at load, `model/linear_calibration.py`) ran our row kernels for "
        f"inputs of up to this many rows, torch's beyond: {'; '.join(shown)}.",
        "",
    ]


def _ffn_crossover(meta: dict[str, Any]) -> list[str]:
    """The batched FFN's costs measured at load (``engine.ffn_calibration``): why prefill took which path."""
    entries = meta.get("ffn_crossover")
    if not entries:  # a result from before the calibration, or no unquantized CPU tier
        return []
    lines = [
        "Batched FFN steps (prefill, batches) of the unquantized tiers: the sparse kernel or torch's GEMMs, "
        "whichever costs less by the costs measured at load (`engine/ffn_calibration.py`), in µs:",
        "",
        "| FFN | sparse, per union neuron | sparse, per (row, neuron) pair | GEMMs per neuron, by rows |",
        "|---|---:|---:|---|",
    ]
    for key, e in entries.items():
        gemms = ", ".join(
            f"{n}: {c * 1e6:.2f}" for n, c in zip(e["gemm_rows"], e["gemm_per_neuron"], strict=True)
        )
        lines.append(f"| {key} | {e['per_neuron'] * 1e6:.2f} | {e['per_pair'] * 1e6:.3f} | {gemms} |")
    return [*lines, ""]


def format_table(result: dict[str, Any]) -> str:
    meta, memory, extras = result["meta"], result["memory"], result["extras"]
    c = meta["config"]
    formats = c["formats"]
    bw = _median(result, "bandwidth") or 0.0
    lines = [
        "# Decode and prefill: ours vs llama.cpp, same weights",
        "",
        f"{meta['date']} · torch {meta['torch']} · {meta['cpu']} (flags: {', '.join(meta['cpu_flags'])}) · "
        f"{meta['threads']} threads · llama.cpp from llama-cpp-python {meta['llama_cpp']['version']}",
        "",
        f"Model: LLaMA-7B-shaped, {c['layers']} layers (hidden 4096, intermediate 11008, vocab 32000), gated "
        f"FATReLU with {c['sparsity']:.0%} of FFN neurons inactive and an exact rank-{c['rank']} predictor "
        "(`bench decode`'s checkpoint), converted with llama.cpp's convert_hf_to_gguf.py and quantized with "
        "llama-quantize (whose q4_0 keeps lm_head at q6_K). llama-bench `-t "
        f"{meta['threads']} -p 0 -n {c['new_tokens']}` (tg) and `-p {c['prompt_tokens']} -n 0` (pp); "
        f"ours: batch-1 decode of {c['new_tokens']} tokens after an {c['decode_prompt_tokens']}-token "
        f"prompt, and one prefill of {c['prompt_tokens']} tokens, per mode, one engine per format "
        f"(`--weights`). Medians of {c['rounds']} interleaved rounds; ratios are medians of the per-round "
        f"ratios. Read bandwidth in the same rounds (read_bytes, 1 GiB in huge pages): median {bw:.1f} GB/s.",
        "",
        *_without_repack(meta),
        *_dense_linear(meta),
        *_ffn_crossover(meta),
        "| format | llama.cpp tok/s | ours dense, SiLU | ours dense | ours predicted "
        "| dense SiLU / llama.cpp | dense / llama.cpp | predicted / llama.cpp "
        "| dense SiLU weight GB/s | predicted weight GB/s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for fmt in formats:
        lc = _median(result, f"llama.cpp/{fmt}/decode")
        dense = _median(result, f"ours/{fmt}/dense/decode")
        silu = _median(result, f"ours/{fmt}/dense-silu/decode")
        pred = _median(result, f"ours/{fmt}/predicted/decode")
        parts = memory[fmt]["weight_bytes"]
        rep = result["reports"].get(f"{fmt}/predicted")
        share = rep["ffn_bytes_read"] / rep["ffn_bytes_dense"] if rep and rep["ffn_bytes_dense"] else 1.0
        pred_bytes = em.step_bytes(parts, share, True)
        dense_bytes = em.step_bytes(parts, 1.0, False)
        vs = {
            mode: _per_round_ratio(result, f"ours/{fmt}/{mode}/decode", f"llama.cpp/{fmt}/decode")
            for mode in ("dense-silu", "dense", "predicted")
        }
        silu_gbps = dense_bytes * silu / 1e9 if silu is not None else None
        lines.append(
            f"| {fmt} | {lc:.2f} | {_f(silu, 2)} | {dense:.2f} | {pred:.2f} | {_x(vs['dense-silu'])} | "
            f"{_x(vs['dense'])} | {_x(vs['predicted'])} | {_f(silu_gbps, 1)} | "
            f"{pred_bytes * pred / 1e9:.1f} |"
        )
    lines += [
        "",
        "Ours dense, SiLU: the same weights with SiLU instead of FATReLU (what llama.cpp computes; its "
        "converter maps the model to SiLU): no gate is exactly zero, every FFN row is read. Ours dense: "
        "dense mode of the FATReLU model, exact results, but the kernel skips the up and down rows of the "
        f"~{c['sparsity']:.0%} of neurons whose gate is exactly zero, so it reads far fewer bytes than a "
        "dense step (no weight GB/s given: its bytes are not a dense step's). Weight GB/s: the bytes one of "
        "our decode steps reads (all weights but the embedding table; in predicted mode the predictors plus "
        "the FFN rows its active sets need, from the request's sparsity report) × tokens/s.",
        "",
        f"Prefill of {c['prompt_tokens']} tokens (tokens/s):",
        "",
        "| format | llama.cpp pp | ours dense, SiLU | ours dense | ours predicted | dense SiLU / llama.cpp "
        "| predicted / llama.cpp |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for fmt in formats:
        lc = _median(result, f"llama.cpp/{fmt}/prefill")
        silu = _median(result, f"ours/{fmt}/dense-silu/prefill")
        dense = _median(result, f"ours/{fmt}/dense/prefill")
        pred = _median(result, f"ours/{fmt}/predicted/prefill")
        ratios = [
            _per_round_ratio(result, f"ours/{fmt}/{mode}/prefill", f"llama.cpp/{fmt}/prefill")
            for mode in ("dense-silu", "predicted")
        ]
        lines.append(
            f"| {fmt} | {lc:.1f} | {_f(silu, 1)} | {dense:.1f} | {pred:.1f} | "
            f"{_x(ratios[0])} | {_x(ratios[1])} |"
        )
    lines += [
        "",
        "Batch-1 projections (weight bytes / time, medians of 8 calls; read bandwidth measured just before):",
        "",
        "| format | read GB/s | " + " | ".join(next(iter(extras.values()))["projections_gbps"]) + " |",
        "|---|---:|" + "---:|" * len(next(iter(extras.values()))["projections_gbps"]),
    ]
    for fmt in formats:
        e = extras[fmt]
        cells = " | ".join(f"{v:.1f} ({v / e['read_gbps']:.0%})" for v in e["projections_gbps"].values())
        lines.append(f"| {fmt} | {e['read_gbps']:.1f} | {cells} |")
    if any(extras[fmt]["batches"] for fmt in formats):  # none with --batches ""
        lines += ["", "Decode at batch > 1 (ours; aggregate tokens/s of the decode steps):", ""]
        lines += ["| format | batch | dense | predicted | predicted / dense |", "|---|---:|---:|---:|---:|"]
        for fmt in formats:
            for batch, rates in extras[fmt]["batches"].items():
                d, p = rates.get("dense"), rates.get("predicted")
                lines.append(f"| {fmt} | {batch} | {d:.1f} | {p:.1f} | {_ratio(p, d)} |")
    lines += [
        "",
        "Memory (ours; resident growth while loading each engine, against the bytes of its weights and of "
        "its KV cache, sized for the largest batch above):",
        "",
    ]
    lines += [
        "| format | weights | KV cache | resident | resident / weights | resident / (weights + KV cache) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for fmt in formats:
        weights = sum(memory[fmt]["weight_bytes"].values())
        kv = memory[fmt].get("kv_cache_bytes")  # None: a result from before it was recorded
        resident = memory[fmt]["resident_bytes"]
        lines.append(
            f"| {fmt} | {weights / 2**30:.2f} GiB | {_gib(kv)} | "
            f"{resident / 2**30:.2f} GiB | {resident / weights:.2f} | "
            f"{_f(kv and resident / (weights + kv), 2)} |"
        )
    return "\n".join(lines) + "\n"
