"""``ModelConfig``: the frozen description of a Llama-family decoder, parsed from a Hugging Face config.json.

Supported architectures are Llama, Mistral (sliding-window attention is ignored: we always attend over the
whole prefix, which is exact while sequences stay shorter than the window), MiniCPM (µP scalings of
embeddings, residual branches and logits) and Bamboo (PowerInfer's TurboSparse-Mistral, a Mistral with dReLU).

The FFN form is not fully described by config.json: the paper's relu/relu2 checkpoints say ``hidden_act:
relu`` for both the non-gated ReLU model and the gated ReGLU one. So the tensor names decide: layer 0 with
both ``gate_proj`` and ``up_proj`` is gated, with exactly one of them non-gated.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from sparseinfer.model.errors import CheckpointError

# architecture name in config.json -> short family name
SUPPORTED_ARCHITECTURES: dict[str, str] = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "MiniCPMForCausalLM": "minicpm",
    "BambooForCausalLM": "bamboo",
}
SUPPORTED_ACTIVATIONS = ("silu", "relu", "relu2", "fatrelu", "drelu")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")

# hidden_act spellings of released checkpoints -> our activation names
_ACTIVATION_ALIASES = {
    "swish": "silu",
    "silu": "silu",
    "relu": "relu",
    "relu2": "relu2",
    "fatrelu": "fatrelu",
}
# dtype names accepted in config.json and on the command line -> torch dtypes
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding parameters; ``factor`` etc. are only read by the scaled rope types."""

    rope_type: str = "default"
    theta: float = 10000.0
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int | None = None


@dataclass(frozen=True)
class ModelConfig:
    architecture: str  # short family name: llama | mistral | minicpm | bamboo
    vocab_size: int
    hidden_size: int  # d
    intermediate_size: int  # m, the number of FFN neurons
    num_layers: int
    num_heads: int
    num_kv_heads: int  # < num_heads means grouped-query attention
    head_dim: int
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    torch_dtype: torch.dtype | None = None  # what config.json declares; the loader trusts the tensors instead
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    rope: RopeConfig = RopeConfig()
    ffn_gated: bool = True
    activation: str = "silu"
    activation_threshold: float = 0.0  # FATReLU's t: h = z if z > t else 0
    # MiniCPM's µP scalings; 1.0 everywhere else, and then the model skips the multiply entirely.
    embedding_scale: float = 1.0  # scale_emb
    residual_scale: float = 1.0  # scale_depth / sqrt(num_layers), applied to each residual branch
    logit_divisor: float = 1.0  # hidden_size / dim_model_base, divides hidden states before lm_head

    def __post_init__(self) -> None:
        if self.activation not in SUPPORTED_ACTIVATIONS:
            raise CheckpointError(
                f"unknown activation {self.activation!r}; supported: {', '.join(SUPPORTED_ACTIVATIONS)}"
            )
        if self.activation == "drelu" and not self.ffn_gated:
            raise CheckpointError(
                "dReLU needs a gated FFN (gate_proj and up_proj) but the checkpoint has one"
            )
        if self.num_heads % self.num_kv_heads != 0:
            raise CheckpointError(
                f"num_attention_heads={self.num_heads} is not a multiple of "
                f"num_key_value_heads={self.num_kv_heads}"
            )

    @classmethod
    def from_hf(cls, hf: Mapping[str, Any], tensor_names: Iterable[str]) -> ModelConfig:
        """Parse a config.json dict; ``tensor_names`` (every tensor in the checkpoint) decide the FFN form."""
        names = set(tensor_names)
        archs = hf.get("architectures") or []
        known = [a for a in archs if a in SUPPORTED_ARCHITECTURES]
        if not known:
            raise CheckpointError(
                f"unsupported architecture {archs or '(none given)'} in config.json; "
                f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        family = SUPPORTED_ARCHITECTURES[known[0]]

        def need(key: str) -> Any:
            if key not in hf:
                raise CheckpointError(f"config.json lacks required key {key!r}")
            return hf[key]

        hidden = int(need("hidden_size"))
        heads = int(need("num_attention_heads"))
        layers = int(need("num_hidden_layers"))
        head_dim = hf.get("head_dim") or hidden // heads

        gated = _ffn_is_gated(names)
        activation, threshold = _parse_activation(hf, family)

        scale_emb = residual_scale = logit_divisor = 1.0
        if family == "minicpm":
            # MiniCPM (µP): embeddings * scale_emb; each residual branch * scale_depth / sqrt(L);
            # final hidden states / (hidden_size / dim_model_base) before the (usually tied) lm_head.
            scale_emb = float(hf.get("scale_emb", 1.0))
            residual_scale = float(hf.get("scale_depth", 1.0)) / math.sqrt(layers)
            logit_divisor = hidden / float(hf.get("dim_model_base", hidden))

        if "tie_word_embeddings" in hf:
            tie = bool(hf["tie_word_embeddings"])
        else:  # configs that omit the key: a checkpoint without an lm_head can only mean tied embeddings
            tie = "lm_head.weight" not in names

        dtype_name = hf.get("torch_dtype") or hf.get("dtype")
        return cls(
            architecture=family,
            vocab_size=int(need("vocab_size")),
            hidden_size=hidden,
            intermediate_size=int(need("intermediate_size")),
            num_layers=layers,
            num_heads=heads,
            num_kv_heads=int(hf.get("num_key_value_heads") or heads),
            head_dim=int(head_dim),
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            max_position_embeddings=int(hf.get("max_position_embeddings", 2048)),
            tie_word_embeddings=tie,
            attention_bias=bool(hf.get("attention_bias", False)),
            mlp_bias=bool(hf.get("mlp_bias", False)),
            torch_dtype=DTYPES.get(dtype_name) if isinstance(dtype_name, str) else None,
            bos_token_id=_first_id(hf.get("bos_token_id")),
            eos_token_ids=_id_tuple(hf.get("eos_token_id")),
            rope=parse_rope(hf),
            ffn_gated=gated,
            activation=activation,
            activation_threshold=threshold,
            embedding_scale=scale_emb,
            residual_scale=residual_scale,
            logit_divisor=logit_divisor,
        )


def _ffn_is_gated(names: set[str]) -> bool:
    has_gate = any(n.endswith("layers.0.mlp.gate_proj.weight") for n in names)
    has_up = any(n.endswith("layers.0.mlp.up_proj.weight") for n in names)
    if not (has_gate or has_up):
        raise CheckpointError(
            "missing tensor model.layers.0.mlp.gate_proj.weight (and up_proj): cannot tell the FFN form; "
            "a gated FFN needs gate_proj and up_proj, a non-gated one exactly one of them, plus down_proj"
        )
    return has_gate and has_up


def _parse_activation(hf: Mapping[str, Any], family: str) -> tuple[str, float]:
    act = str(hf.get("hidden_act", "silu")).lower()
    threshold = 0.0
    if act == "drelu" or (family == "bamboo" and act == "relu"):
        # TurboSparse/Bamboo say hidden_act "relu" but their modeling code applies ReLU to gate AND up.
        return "drelu", 0.0
    if act not in _ACTIVATION_ALIASES:
        raise CheckpointError(
            f"unknown activation hidden_act={act!r} in config.json; "
            f"supported: {', '.join(SUPPORTED_ACTIVATIONS)}"
        )
    act = _ACTIVATION_ALIASES[act]
    if act == "fatrelu":  # ProSparse / MiniCPM-S: the threshold is hidden_act_param
        threshold = float(hf.get("hidden_act_param", 0.0))
    return act, threshold


def parse_rope(hf: Mapping[str, Any]) -> RopeConfig:
    """Read both the new ``rope_parameters`` dict and the old ``rope_theta`` + ``rope_scaling`` pair."""
    params = hf.get("rope_parameters")
    if isinstance(params, Mapping) and "rope_type" not in params and "rope_theta" not in params:
        params = None  # per-layer-type dicts (not a Llama-family feature): fall back to the old keys
    if params is None:
        params = dict(hf.get("rope_scaling") or {})
        params.setdefault("rope_theta", hf.get("rope_theta", 10000.0))
    rope_type = params.get("rope_type") or params.get("type") or "default"
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise CheckpointError(
            f"unknown rope type {rope_type!r}; supported: {', '.join(SUPPORTED_ROPE_TYPES)}"
        )
    orig = params.get("original_max_position_embeddings")
    if rope_type == "llama3" and orig is None:
        orig = hf.get("max_position_embeddings")  # what transformers falls back to
    return RopeConfig(
        rope_type=rope_type,
        theta=float(params.get("rope_theta", hf.get("rope_theta", 10000.0))),
        factor=float(params.get("factor", 1.0)),
        low_freq_factor=float(params.get("low_freq_factor", 1.0)),
        high_freq_factor=float(params.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=int(orig) if orig is not None else None,
    )


def _id_tuple(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, int):
        return (value,)
    return tuple(int(v) for v in value)


def _first_id(value: Any) -> int | None:
    ids = _id_tuple(value)
    return ids[0] if ids else None
