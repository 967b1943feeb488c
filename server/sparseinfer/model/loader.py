"""``load_model``: a Hugging Face checkpoint directory (config.json + safetensors) -> ``Transformer``.

Memory: the module is built on the ``meta`` device (no weight memory, no random init) and each parameter is
then replaced by the checkpoint tensor itself, served zero-copy from the memory-mapped file. A copy is made
only when a tensor must change dtype or device, so loading in the checkpoint's own dtype on the CPU costs no
RAM beyond the page cache.

Names: our parameters are the checkpoint's names without the leading ``model.``; the one rename is a non-gated
FFN whose single in-projection is stored as ``up_proj``: it becomes our ``gate_proj`` (see ffn.py).

Tied embeddings: lm_head shares the embedding tensor when config.json says ``tie_word_embeddings: true`` (an
``lm_head.weight`` in the file is then ignored, as transformers does) or, when config.json does not say, when
the file has no ``lm_head.weight``. A config that says ``false`` with no lm_head in the file is a
missing-tensor error.

Every expected tensor must be present with the expected shape; extra tensors that are known to be harmless
(rotary caches) are skipped silently, any other extra tensor (e.g. predictors merged into TurboSparse
checkpoints) is named in a warning and ignored.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from torch import nn

from sparseinfer.model.config import ModelConfig
from sparseinfer.model.errors import CheckpointError
from sparseinfer.model.linear import use_row_kernels
from sparseinfer.model.safetensors_io import CheckpointTensors
from sparseinfer.model.transformer import Transformer

log = logging.getLogger(__name__)

_HARMLESS_SUFFIXES = ("rotary_emb.inv_freq", "rotary_emb.cos_cached", "rotary_emb.sin_cached")


def read_config_json(path: str | Path) -> dict:
    """config.json of a checkpoint directory as a dict, or a CheckpointError saying what is wrong."""
    file = Path(path) / "config.json"
    if not file.is_file():
        raise CheckpointError(
            f"{Path(path)}: missing config.json (expected a Hugging Face checkpoint directory)"
        )
    try:
        raw = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{file}: not valid JSON ({e})") from e
    if not isinstance(raw, dict):
        raise CheckpointError(f"{file}: expected a JSON object")
    return raw


def expected_tensors(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Our parameter name -> shape, for every parameter the model needs (tied lm_head excluded)."""
    d, m, hd = config.hidden_size, config.intermediate_size, config.head_dim
    q_out, kv_out = config.num_heads * hd, config.num_kv_heads * hd
    shapes: dict[str, tuple[int, ...]] = {"embed_tokens.weight": (config.vocab_size, d), "norm.weight": (d,)}
    if not config.tie_word_embeddings:
        shapes["lm_head.weight"] = (config.vocab_size, d)
    for i in range(config.num_layers):
        p = f"layers.{i}."
        shapes[p + "input_layernorm.weight"] = (d,)
        shapes[p + "post_attention_layernorm.weight"] = (d,)
        for name, out_features, in_features in (
            ("q_proj", q_out, d),
            ("k_proj", kv_out, d),
            ("v_proj", kv_out, d),
            ("o_proj", d, q_out),
        ):
            shapes[f"{p}self_attn.{name}.weight"] = (out_features, in_features)
            if config.attention_bias:
                shapes[f"{p}self_attn.{name}.bias"] = (out_features,)
        ffn = [("gate_proj", m, d), ("down_proj", d, m)]
        if config.ffn_gated:
            ffn.append(("up_proj", m, d))
        for name, out_features, in_features in ffn:
            shapes[f"{p}mlp.{name}.weight"] = (out_features, in_features)
            if config.mlp_bias:
                shapes[f"{p}mlp.{name}.bias"] = (out_features,)
    return shapes


def _checkpoint_name(ours: str, config: ModelConfig, tensors: CheckpointTensors) -> str:
    """Where our parameter ``ours`` lives in the checkpoint."""
    name = ours if ours == "lm_head.weight" else "model." + ours
    if not config.ffn_gated and ".mlp.gate_proj." in name and name not in tensors:
        name = name.replace(".mlp.gate_proj.", ".mlp.up_proj.")  # non-gated in-projection stored as up_proj
    return name


def load_model(
    path: str | Path,
    dtype: torch.dtype | None = None,
    device: torch.device | str = "cpu",
    dense_linear: str | None = "auto",
) -> Transformer:
    """Load a Llama-family checkpoint; ``dtype=None`` keeps the checkpoint's dtype (zero-copy on the CPU).
    ``dense_linear`` decides the kernel of every dense projection (``linear.use_row_kernels``; None: leave
    the choice to the caller, torch's until it is made)."""
    path = Path(path)
    raw = read_config_json(path)
    tensors = CheckpointTensors(path)
    config = ModelConfig.from_hf(raw, tensors)

    shapes = expected_tensors(config)
    where = {ours: _checkpoint_name(ours, config, tensors) for ours in shapes}
    missing = [f"{where[o]} (expected shape {list(s)})" for o, s in shapes.items() if where[o] not in tensors]
    if missing:
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise CheckpointError(f"{path}: missing tensor(s) {', '.join(missing[:5])}{more}")
    for ours, shape in shapes.items():
        actual = tensors.shape(where[ours])
        if tuple(actual) != shape:
            raise CheckpointError(
                f"{path}: tensor {where[ours]} has shape {list(actual)}, expected {list(shape)} "
                f"(from config.json: hidden_size={config.hidden_size}, "
                f"intermediate_size={config.intermediate_size}, "
                f"heads={config.num_heads}, kv_heads={config.num_kv_heads}, head_dim={config.head_dim}, "
                f"vocab_size={config.vocab_size})"
            )
    used = set(where.values()) | {"lm_head.weight"}
    extra = [n for n in tensors if n not in used and not n.endswith(_HARMLESS_SUFFIXES)]
    if extra:
        log.warning("%s: ignoring %d unexpected tensor(s): %s", path, len(extra), ", ".join(extra[:10]))

    if dtype is None:
        dtype = tensors.dtype(where["embed_tokens.weight"])
    if not dtype.is_floating_point:
        raise CheckpointError(f"{path}: cannot run a model in {dtype}; use float32, bfloat16 or float16")

    with torch.device("meta"):
        model = Transformer(config)
    for ours in shapes:
        t = tensors.tensor(where[ours]).to(
            device=device, dtype=dtype
        )  # no-op (same storage) when nothing changes
        module_name, _, param_name = ours.rpartition(".")
        module = model.get_submodule(module_name)
        setattr(module, param_name, nn.Parameter(t, requires_grad=False))
    if config.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    meta = [n for n, p in model.named_parameters() if p.is_meta]
    assert not meta, f"parameters left unloaded: {meta}"  # expected_tensors and Transformer disagree: a bug
    if dense_linear is not None:
        use_row_kernels(model, dense_linear)
    return model.eval()
