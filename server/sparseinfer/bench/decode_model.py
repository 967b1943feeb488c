"""The decode benchmark's model: a LLaMA-7B-shaped bf16 checkpoint with 90% FATReLU sparsity and an exact
low-rank predictor, written once and reused (``sparseinfer.bench.decode`` measures it).

The FATReLU threshold is the ``sparsity`` quantile of the gate pre-activations of RMS-normalised random
inputs, so that share of the neurons is inactive for every token. The predictor is exact by construction,
not trained: the gate projection is written low-rank, W_gate = A·B with A (m, r), B (r, d), so the low-rank
predictor W2 = A, W1 = B, b2 = −threshold has logits = W_gate x − t and selects exactly the neurons FATReLU
keeps, except for bf16 rounding (A·(B·x) and (A·B)·x round differently); a margin of 2% of t below the
threshold (b2 = −0.98 t, ~3× the rounding error) makes it select every kept neuron plus a few that FATReLU
then zeroes, which costs a little bandwidth and nothing in accuracy. The sidecar holds it as the
``predictor`` section (score threshold 0.5 = logit 0) next to a ``calibration`` with a negligible ε, so the
engine loads everything through its ordinary path.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Protocol, TextIO

import torch

SHAPE = {"hidden": 4096, "intermediate": 11008, "heads": 32, "vocab": 32000}
MARGIN = 0.02  # the predictor's selection margin below the FATReLU threshold, as a share of it


class ModelSpec(Protocol):
    """What the checkpoint depends on (``DecodeBenchConfig`` has it)."""

    layers: int
    sparsity: float
    rank: int
    seed: int

    @property
    def path(self) -> Path: ...


def write_checkpoint(config: ModelSpec, out: TextIO) -> Path:
    """Write (once) the bf16 checkpoint, tokenizer and sidecar described in the module docstring."""
    from safetensors.torch import save_file

    from sparseinfer.model.random_checkpoint import build_tokenizer
    from sparseinfer.sparsity.sidecar import Sidecar

    path = config.path
    marker = path / "bench.json"
    if marker.is_file() and json.loads(marker.read_text()) == _marker(config):
        return path
    out.write(f"writing the benchmark checkpoint to {path} (once) ...\n")
    path.mkdir(parents=True, exist_ok=True)
    d, m, H, V, L, r = (
        SHAPE["hidden"],
        SHAPE["intermediate"],
        SHAPE["heads"],
        SHAPE["vocab"],
        config.layers,
        config.rank,
    )
    g = torch.Generator().manual_seed(config.seed)
    std = 0.02

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g).mul_(std).to(torch.bfloat16)

    # Gate pre-activations of RMS-normalised inputs (‖x‖² = d): pick the threshold at the sparsity quantile.
    x = torch.randn(64, d, generator=g)
    x = x * (d**0.5) / x.norm(dim=1, keepdim=True)  # (64, d)
    tensors: dict[str, torch.Tensor] = {
        "model.embed_tokens.weight": randn(V, d),
        "lm_head.weight": randn(V, d),
    }
    tensors["model.norm.weight"] = torch.ones(d, dtype=torch.bfloat16)
    pred: dict[str, torch.Tensor] = {}
    gates = []
    for i in range(L):
        p = f"model.layers.{i}."
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            tensors[p + f"self_attn.{name}.weight"] = randn(d, d)
        tensors[p + "input_layernorm.weight"] = torch.ones(d, dtype=torch.bfloat16)
        tensors[p + "post_attention_layernorm.weight"] = torch.ones(d, dtype=torch.bfloat16)
        a = torch.randn(m, r, generator=g) / r**0.5  # (m, r)
        b = torch.randn(r, d, generator=g) * std  # (r, d)
        gate = (a @ b).to(torch.bfloat16)  # (m, d): rank r
        gates.append(gate)
        tensors[p + "mlp.gate_proj.weight"] = gate
        tensors[p + "mlp.up_proj.weight"] = randn(m, d)
        tensors[p + "mlp.down_proj.weight"] = randn(d, m)
        pred[f"predictor.{i}.w1"], pred[f"predictor.{i}.b1"] = b, torch.zeros(r)
        pred[f"predictor.{i}.w2"] = a
    z = torch.cat([x @ gate.float().t() for gate in gates])  # (64·L, m)
    threshold = float(torch.quantile(z.flatten()[:: max(1, z.numel() // 4_000_000)], config.sparsity))
    for i in range(L):
        pred[f"predictor.{i}.b2"] = torch.full((m,), -(1.0 - MARGIN) * threshold)
    pred["predictor.score_threshold"] = torch.full((L,), 0.5)
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    hf = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": V,
        "hidden_size": d,
        "intermediate_size": m,
        "num_hidden_layers": L,
        "num_attention_heads": H,
        "num_key_value_heads": H,
        "hidden_act": "fatrelu",
        "hidden_act_param": threshold,
        "rms_norm_eps": 1e-6,
        "max_position_embeddings": 2048,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
        "bos_token_id": 0,
        "eos_token_id": 1,
        "torch_dtype": "bfloat16",
    }
    (path / "config.json").write_text(json.dumps(hf, indent=2))
    build_tokenizer(V).save(str(path / "tokenizer.json"))
    sidecar = Sidecar.open(path)
    sidecar.set_section("calibration", {"thresholds": torch.full((L,), 1e-30)}, {"note": "bench: ε ≈ 0"})
    manifest = {"rank": r, "hidden_activation": None, "recall_target": 1.0, "score_scale": "probability"}
    sidecar.set_section("predictor", pred, {**manifest, "note": "exact low-rank predictor (bench)"})
    sidecar.save()
    marker.write_text(json.dumps(_marker(config)))
    return path


def _marker(config: ModelSpec) -> dict[str, Any]:
    return {
        "margin": MARGIN,
        "layers": config.layers,
        "sparsity": config.sparsity,
        "rank": config.rank,
        "seed": config.seed,
        **SHAPE,
    }
