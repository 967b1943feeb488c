"""Variants transformers has no class for (non-gated FFNs, FATReLU, dReLU, MiniCPM) against a from-scratch
formula.

``reference_logits`` is deliberately written without any sparseinfer code: straight from the checkpoint
tensors, full-sequence causal attention with explicit head repetition and softmax, explicit rotate-half rope.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from sparseinfer.model import load_model
from sparseinfer.model.random_checkpoint import write_random_checkpoint

ACTIVATIONS = {
    "silu": F.silu,
    "relu": F.relu,
    "relu2": lambda z: F.relu(z) ** 2,
    "fatrelu": lambda z: torch.where(z > 0.05, z, torch.zeros_like(z)),
    "drelu": F.relu,
}


def reference_logits(path, tokens: torch.Tensor) -> torch.Tensor:
    cfg = json.loads((path / "config.json").read_text())
    w = {k.removeprefix("model."): v.double() for k, v in load_file(path / "model.safetensors").items()}
    H, KVH, L = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["num_hidden_layers"]
    hd = cfg["hidden_size"] // H
    act = ACTIVATIONS[cfg["hidden_act"]]
    minicpm = cfg.get("model_type") == "minicpm"
    branch = cfg["scale_depth"] / math.sqrt(L) if minicpm else 1.0

    def norm(x, weight):
        return weight * x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + cfg["rms_norm_eps"])

    T = tokens.shape[1]
    inv_freq = 1.0 / cfg["rope_theta"] ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd)
    angle = torch.arange(T, dtype=torch.float64)[:, None] * inv_freq  # (T, hd/2)
    cos, sin = angle.cos().repeat(1, 2), angle.sin().repeat(1, 2)  # (T, hd)

    def rope(x):  # (B, heads, T, hd)
        x1, x2 = x[..., : hd // 2], x[..., hd // 2 :]
        return x * cos + torch.cat([-x2, x1], -1) * sin

    x = w["embed_tokens.weight"][tokens] * (cfg["scale_emb"] if minicpm else 1.0)  # (B, T, d)
    B = x.shape[0]
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    for i in range(L):
        p = f"layers.{i}."
        h = norm(x, w[p + "input_layernorm.weight"])
        q = rope((h @ w[p + "self_attn.q_proj.weight"].T).view(B, T, H, hd).transpose(1, 2))
        k = rope((h @ w[p + "self_attn.k_proj.weight"].T).view(B, T, KVH, hd).transpose(1, 2))
        v = (h @ w[p + "self_attn.v_proj.weight"].T).view(B, T, KVH, hd).transpose(1, 2)
        k, v = k.repeat_interleave(H // KVH, 1), v.repeat_interleave(H // KVH, 1)
        scores = (q @ k.transpose(-1, -2) / math.sqrt(hd)).masked_fill(~causal, float("-inf"))
        attn = (scores.softmax(-1) @ v).transpose(1, 2).reshape(B, T, H * hd)
        x = x + branch * attn @ w[p + "self_attn.o_proj.weight"].T
        h = norm(x, w[p + "post_attention_layernorm.weight"])
        projections = [
            w[p + f"mlp.{n}.weight"] for n in ("gate_proj", "up_proj") if p + f"mlp.{n}.weight" in w
        ]
        if len(projections) == 2:  # gated: σ(W_gate h) ⊙ W_up h (dReLU: relu on both)
            gate, up = (h @ projections[0].T), (h @ projections[1].T)
            neurons = act(gate) * (F.relu(up) if cfg["hidden_act"] == "drelu" else up)
        else:  # non-gated: σ(W_in h), W_in stored under either name
            neurons = act(h @ projections[0].T)
        x = x + branch * neurons @ w[p + "mlp.down_proj.weight"].T
    x = norm(x, w["norm.weight"])
    if minicpm:
        x = x / (cfg["hidden_size"] / cfg["dim_model_base"])
    head = w["embed_tokens.weight"] if cfg["tie_word_embeddings"] else w["lm_head.weight"]
    return (x @ head.T).float()


CASES = {
    "relu-nongated": dict(activation="relu", gated=False),
    "relu2-nongated-tied": dict(activation="relu2", gated=False, tie=True),
    "fatrelu-gated": dict(activation="fatrelu", gated=True, extra_config={"hidden_act_param": 0.05}),
    "drelu-gated": dict(activation="drelu", gated=True),
    "minicpm-silu": dict(
        activation="silu",
        gated=True,
        tie=True,
        extra_config={
            "architectures": ["MiniCPMForCausalLM"],
            "model_type": "minicpm",
            "scale_emb": 12.0,
            "scale_depth": 1.4,
            "dim_model_base": 16,
        },
    ),
    "minicpm-fatrelu": dict(
        activation="fatrelu",
        gated=True,
        extra_config={
            "architectures": ["MiniCPMForCausalLM"],
            "model_type": "minicpm",
            "hidden_act_param": 0.05,
            "scale_emb": 12.0,
            "scale_depth": 1.4,
            "dim_model_base": 16,
        },
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_matches_reference_formula(tmp_path, case):
    path = write_random_checkpoint(tmp_path, **CASES[case])
    model = load_model(path)
    tokens = torch.randint(2, 500, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        got = model(tokens)
        expected = reference_logits(path, tokens)
        assert (got - expected).abs().max() < 1e-4
        # and the cached decode path agrees with the full forward
        cache = model.new_cache(max_batch=2, max_seq=16)
        slots = torch.tensor([cache.allocate(), cache.allocate()])
        pieces = [model(tokens[:, :6], cache, slots)] + [
            model(tokens[:, t : t + 1], cache, slots) for t in range(6, 10)
        ]
        assert (torch.cat(pieces, 1) - got).abs().max() < 1e-5


def test_nongated_in_projection_stored_as_up_proj(tmp_path):
    """Nemotron-style non-gated checkpoints name W_in up_proj; it must land in our gate_proj."""
    path = write_random_checkpoint(tmp_path, activation="relu2", gated=False)
    tensors = load_file(path / "model.safetensors")
    renamed = {k.replace("mlp.gate_proj", "mlp.up_proj"): v for k, v in tensors.items()}
    save_file(renamed, str(path / "model.safetensors"))
    model = load_model(path)
    assert not model.config.ffn_gated and model.layers[0].mlp.up_proj is None
    torch.testing.assert_close(
        model.layers[1].mlp.gate_proj.weight, tensors["model.layers.1.mlp.gate_proj.weight"]
    )
    tokens = torch.randint(2, 500, (1, 8))
    with torch.inference_mode():
        assert (model(tokens) - reference_logits(path, tokens)).abs().max() < 1e-4


def test_neuron_activations_and_down_proj_give_the_ffn(tiny_random_checkpoint):
    """The sparsity toolkit's contract: FFN(x) = W_out h, with W_out = down_proj.weight of shape (d, m)."""
    model = load_model(tiny_random_checkpoint)
    ffn = model.layers[0].mlp
    x = torch.randn(3, 5, model.config.hidden_size)
    with torch.inference_mode():
        h = ffn.neuron_activations(x)
        assert h.shape == (3, 5, model.config.intermediate_size)
        assert ffn.down_proj.weight.shape == (model.config.hidden_size, model.config.intermediate_size)
        torch.testing.assert_close(ffn(x), h @ ffn.down_proj.weight.T)
        assert (h >= 0).all()  # relu2 neurons are non-negative
