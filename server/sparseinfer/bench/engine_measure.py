"""What the llama.cpp comparison measures on our side: decode and prefill rates of an engine in each mode,
the weight bytes a step reads, each batch-1 projection's bandwidth, resident memory, and the machine's read
bandwidth (``ops`` read_bytes over a buffer in huge pages, as the weights are)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from sparseinfer.engine.generate import Engine
from sparseinfer.engine.sampling import SamplingParams
from sparseinfer.model.step import SparsityMode


def read_bandwidth(buf: torch.Tensor, reps: int = 3) -> float:
    """GB/s of reading ``buf`` once on all threads, best of ``reps`` (after one warm-up read)."""
    torch.ops.sparseinfer.read_bytes(buf)
    best = min(_timed(lambda: torch.ops.sparseinfer.read_bytes(buf)) for _ in range(reps))
    return buf.numel() * buf.element_size() / best / 1e9


def _timed(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def decode_rate(engine: Engine, prompt: list[int], mode: str, new_tokens: int) -> tuple[float, Any]:
    """Batch-1 decode tokens/s (tokens after the first / time after the first) and the request's report."""
    params = SamplingParams(temperature=0.0, max_new_tokens=new_tokens, ignore_eos=True)
    seq = engine.start(prompt, params, sparsity_mode=mode)
    for _ in engine.stream(seq):
        pass
    return seq.stats().decode_tokens_per_s, seq.sparsity.report()


def prefill_rate(engine: Engine, prompt: list[int], mode: str) -> float:
    """Prompt tokens/s of one prefill (the first token's sampling included, as llama-bench's pp is)."""
    params = SamplingParams(temperature=0.0, max_new_tokens=1, ignore_eos=True)
    result = engine.generate(prompt, params, sparsity_mode=mode)
    return len(prompt) / result.stats.ttft_s


def batch_rate(engine: Engine, prompts: list[list[int]], mode: str, new_tokens: int) -> float:
    """Aggregate decode tokens/s of ``len(prompts)`` requests decoded together (their decode steps only)."""
    params = SamplingParams(temperature=0.0, max_new_tokens=new_tokens, ignore_eos=True)
    seqs = [engine.start(p, params, request_id=i, sparsity_mode=mode) for i, p in enumerate(prompts)]
    engine.prefill_batch(seqs)
    start = time.perf_counter()
    steps = 0
    while live := [s for s in seqs if not s.finished]:
        engine.decode_step(live)
        steps += len(live)
    elapsed = time.perf_counter() - start
    for s in seqs:
        engine.release(s)
    return steps / elapsed


def weight_bytes(engine: Engine) -> dict[str, int]:
    """Bytes of what the engine's model holds, by part: the embedding table, the other dense parts, the FFN
    (dense modules or the sparse runtime's tiers) and the predictors."""
    model = engine.model
    out = {"embedding": 0, "dense": 0, "ffn": 0, "predictors": 0}
    seen: set[int] = set()
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if t is None or t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        part = "embedding" if name.startswith("embed_tokens") else "ffn" if ".mlp." in name else "dense"
        out[part] += t.numel() * t.element_size()
    for layer in model.layers:
        mlp = layer.mlp
        if hasattr(mlp, "tiered"):
            out["ffn"] += sum(t.nbytes for t in mlp.tiered.tiers)
            if mlp.predictor is not None:
                out["predictors"] += mlp.predictor.nbytes
    return out


def step_bytes(parts: dict[str, int], ffn_share: float, with_predictors: bool) -> int:
    """Weight bytes one batch-1 decode step reads: all but the embedding table (one row of it), the FFN
    scaled by the share of its neuron bytes read, the predictors in predicted mode."""
    return round(parts["dense"] + parts["ffn"] * ffn_share + (parts["predictors"] if with_predictors else 0))


def resident_bytes() -> int:
    """This process's resident set (Linux /proc)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def projection_bandwidth(engine: Engine, reps: int = 8, seed: int = 0) -> dict[str, float]:
    """GB/s of each kind of batch-1 projection of ``engine`` (weight bytes / time): an attention
    projection (the fused q/k/v one, or q_proj; rotated over the layers so no weight sits in cache),
    lm_head, a predictor, and the sparse FFN over the union its predictor selects (predicted-mode engines
    only). Medians of ``reps``."""
    model = engine.model
    d = model.config.hidden_size
    g = torch.Generator().manual_seed(seed)
    dtype = model.embed_tokens.weight.dtype
    xs = [torch.randn(1, d, generator=g).to(dtype) for _ in range(len(model.layers))]
    xs = [x * (d**0.5) / x.float().norm() for x in xs]  # RMS-normalised, as the FFN input is
    cases: dict[str, tuple[Callable[[int], Any], int]] = {}
    layers = list(model.layers)

    def nbytes(module: torch.nn.Module) -> int:
        return sum(
            t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()] if t is not None
        )

    q = [lay.self_attn.qkv_proj or lay.self_attn.q_proj for lay in layers]
    cases["attention (q/k/v)"] = (lambda i: q[i % len(q)](xs[i % len(q)]), nbytes(q[0]))
    cases["lm_head"] = (lambda i: model.lm_head(xs[0]), nbytes(model.lm_head))
    sparse = [lay.mlp for lay in layers if getattr(lay.mlp, "predictor", None) is not None]
    if sparse:
        pred = [m.predictor for m in sparse]
        cases["predictor"] = (lambda i: pred[i % len(pred)].scores(xs[i % len(pred)]), pred[0].nbytes)
        unions = []
        for m, x in zip(sparse, xs, strict=False):
            _, union = m._predict(x)
            unions.append(union)
        tier = sparse[0].tiered.tiers[0]
        per_neuron = tier.nbytes // max(tier.size, 1)
        cases["sparse FFN (predicted rows)"] = (
            lambda i: sparse[i % len(sparse)].tiered.forward(
                xs[i % len(sparse)], unions[i % len(sparse)], None, 1.0
            ),
            round(statistics.mean(int(u.numel()) for u in unions) * per_neuron),
        )
    out = {}
    with torch.inference_mode():
        for name, (fn, size) in cases.items():
            fn(0)
            times = [_timed(lambda i=i, fn=fn: fn(i)) for i in range(reps)]
            out[name] = size / statistics.median(times) / 1e9
    return out


def modes_of(engine: Engine) -> tuple[str, ...]:
    """The modes to run: dense always, predicted where the engine's sidecar has predictors."""
    runtime = engine.sparsity
    modes = [SparsityMode.DENSE.value]
    if runtime is not None:
        try:
            runtime.check_mode(SparsityMode.PREDICTED)
            modes.append(SparsityMode.PREDICTED.value)
        except ValueError:
            pass
    return tuple(modes)
