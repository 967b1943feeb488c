"""config.json parsing: architectures, FFN form from tensor names, activations, rope (old and new keys)."""

from __future__ import annotations

import math

import pytest
import torch

from sparseinfer.model import CheckpointError, ModelConfig
from sparseinfer.model.config import RopeConfig, parse_rope
from sparseinfer.model.rope import inverse_frequencies

BASE = dict(
    architectures=["LlamaForCausalLM"],
    vocab_size=100,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=4,
    num_attention_heads=4,
)
GATED = ["model.layers.0.mlp.gate_proj.weight", "model.layers.0.mlp.up_proj.weight", "lm_head.weight"]
NON_GATED = ["model.layers.0.mlp.gate_proj.weight", "lm_head.weight"]


def parse(names=GATED, **overrides) -> ModelConfig:
    return ModelConfig.from_hf({**BASE, **overrides}, names)


def test_defaults_and_derived_fields():
    c = parse(eos_token_id=[2, 7], bos_token_id=1, torch_dtype="bfloat16")
    assert (c.num_kv_heads, c.head_dim, c.activation, c.ffn_gated) == (4, 16, "silu", True)
    assert c.eos_token_ids == (2, 7) and c.bos_token_id == 1 and c.torch_dtype == torch.bfloat16
    assert parse(head_dim=32, num_key_value_heads=2).head_dim == 32


def test_ffn_form_comes_from_tensor_names():
    # the paper's relu checkpoints say hidden_act "relu" both for non-gated ReLU and gated ReGLU
    assert parse(GATED, hidden_act="relu").ffn_gated
    assert not parse(NON_GATED, hidden_act="relu").ffn_gated
    assert not parse(["model.layers.0.mlp.up_proj.weight"], hidden_act="relu2").ffn_gated


def test_sparse_activation_variants():
    fat = parse(hidden_act="fatrelu", hidden_act_param=0.01)
    assert (fat.activation, fat.activation_threshold) == ("fatrelu", 0.01)
    assert parse(hidden_act="drelu").activation == "drelu"
    # TurboSparse-Mistral: BambooForCausalLM with hidden_act "relu" is dReLU
    assert parse(architectures=["BambooForCausalLM"], hidden_act="relu").activation == "drelu"
    with pytest.raises(CheckpointError, match="dReLU needs a gated FFN"):
        parse(NON_GATED, hidden_act="drelu")


def test_minicpm_scalings():
    c = parse(
        architectures=["MiniCPMForCausalLM"],
        scale_emb=12,
        scale_depth=1.4,
        dim_model_base=256,
        hidden_size=1024,
    )
    assert c.architecture == "minicpm"
    assert c.embedding_scale == 12 and c.residual_scale == pytest.approx(1.4 / math.sqrt(4))
    assert c.logit_divisor == 4.0


def test_tie_word_embeddings_defaults_to_absence_of_lm_head():
    assert parse(["model.layers.0.mlp.gate_proj.weight"]).tie_word_embeddings
    assert not parse(GATED).tie_word_embeddings
    assert parse(GATED, tie_word_embeddings=True).tie_word_embeddings


def test_old_and_new_rope_keys_agree():
    new = parse_rope({"rope_parameters": {"rope_type": "linear", "rope_theta": 5e5, "factor": 2.0}})
    old = parse_rope({"rope_theta": 5e5, "rope_scaling": {"type": "linear", "factor": 2.0}})
    old2 = parse_rope({"rope_theta": 5e5, "rope_scaling": {"rope_type": "linear", "factor": 2.0}})
    assert new == old == old2 == RopeConfig("linear", 5e5, 2.0)
    assert parse_rope({}) == RopeConfig()
    llama3 = parse_rope(
        {
            "max_position_embeddings": 4096,
            "rope_scaling": {
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
            },
        }
    )
    assert llama3.original_max_position_embeddings == 4096  # transformers' fallback


@pytest.mark.parametrize(
    "rope_parameters",
    [
        {"rope_type": "default", "rope_theta": 10000.0},
        {"rope_type": "linear", "rope_theta": 500000.0, "factor": 4.0},
        {
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
    ],
)
def test_inverse_frequencies_match_transformers_exactly(rope_parameters):
    transformers = pytest.importorskip("transformers")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    hf_config = transformers.LlamaConfig(
        hidden_size=1024,
        num_attention_heads=8,
        rope_parameters=rope_parameters,
        max_position_embeddings=131072,
    )
    if rope_parameters["rope_type"] == "default":
        expected, _ = LlamaRotaryEmbedding.compute_default_rope_parameters(hf_config)
    else:
        expected, _ = ROPE_INIT_FUNCTIONS[rope_parameters["rope_type"]](hf_config)
    ours = inverse_frequencies(parse_rope(hf_config.to_dict()), head_dim=128)
    assert torch.equal(ours, expected)
