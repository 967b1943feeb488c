"""Every way a checkpoint can be wrong raises CheckpointError with a message that names the problem."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file

from sparseinfer.model import CheckpointError, load_model, load_tokenizer
from sparseinfer.model.random_checkpoint import write_random_checkpoint


@pytest.fixture
def ckpt(tmp_path):
    return write_random_checkpoint(tmp_path / "ckpt")


def edit_config(path, **changes):
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(changes)
    (path / "config.json").write_text(json.dumps(cfg))


def edit_tensors(path, fn):
    tensors = load_file(path / "model.safetensors")
    fn(tensors)
    save_file(tensors, str(path / "model.safetensors"))


def test_missing_tensor(ckpt):
    edit_tensors(ckpt, lambda t: t.pop("model.layers.1.self_attn.k_proj.weight"))
    with pytest.raises(
        CheckpointError, match=r"missing tensor.*model\.layers\.1\.self_attn\.k_proj\.weight.*\[32, 64\]"
    ):
        load_model(ckpt)


def test_missing_lm_head_when_config_says_untied(ckpt):
    edit_tensors(ckpt, lambda t: t.pop("lm_head.weight"))
    with pytest.raises(CheckpointError, match=r"missing tensor.*lm_head\.weight"):
        load_model(ckpt)


def test_missing_ffn_projections(ckpt):
    edit_tensors(ckpt, lambda t: t.pop("model.layers.0.mlp.gate_proj.weight"))
    with pytest.raises(CheckpointError, match=r"gate_proj.*FFN"):
        load_model(ckpt)


def test_misshaped_tensor(ckpt):
    def shrink(t):
        t["model.layers.0.mlp.down_proj.weight"] = torch.zeros(64, 100)

    edit_tensors(ckpt, shrink)
    with pytest.raises(
        CheckpointError,
        match=r"model\.layers\.0\.mlp\.down_proj\.weight has shape \[64, 100\], expected \[64, 256\]",
    ):
        load_model(ckpt)


def test_unknown_architecture(ckpt):
    edit_config(ckpt, architectures=["GPT2LMHeadModel"])
    with pytest.raises(
        CheckpointError, match=r"GPT2LMHeadModel.*supported: LlamaForCausalLM, MistralForCausalLM"
    ):
        load_model(ckpt)


def test_unknown_activation(ckpt):
    edit_config(ckpt, hidden_act="gelu_new")
    with pytest.raises(CheckpointError, match=r"gelu_new.*supported: silu, relu, relu2, fatrelu, drelu"):
        load_model(ckpt)


def test_unknown_rope_type(ckpt):
    edit_config(ckpt, rope_scaling={"type": "yarn", "factor": 4.0})
    with pytest.raises(CheckpointError, match=r"rope type 'yarn'.*supported: default, linear, llama3"):
        load_model(ckpt)


def test_truncated_safetensors(ckpt):
    data = (ckpt / "model.safetensors").read_bytes()
    (ckpt / "model.safetensors").write_bytes(data[: len(data) - 1000])
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*tensor '.*'.*outside.*truncated"):
        load_model(ckpt)


def test_garbage_header(ckpt):
    (ckpt / "model.safetensors").write_bytes(struct.pack("<Q", 16) + b"{not json at all" + b"\0" * 64)
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*header is not valid JSON"):
        load_model(ckpt)


def test_absurd_header_length(ckpt):
    (ckpt / "model.safetensors").write_bytes(struct.pack("<Q", 1 << 40) + b"{}")
    with pytest.raises(CheckpointError, match=r"header length .* does not fit"):
        load_model(ckpt)


def test_size_inconsistent_with_shape(ckpt):
    header = json.dumps({"w": {"dtype": "F32", "shape": [3, 3], "data_offsets": [0, 32]}}).encode()
    (ckpt / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 32)
    with pytest.raises(CheckpointError, match=r"tensor 'w'.*32 bytes for shape \[3, 3\] F32, which needs 36"):
        load_model(ckpt)


def test_missing_safetensors(ckpt):
    (ckpt / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"no model\.safetensors or model\.safetensors\.index\.json"):
        load_model(ckpt)


def test_missing_config(ckpt):
    (ckpt / "config.json").unlink()
    with pytest.raises(CheckpointError, match=r"missing config\.json"):
        load_model(ckpt)


def test_invalid_config_json(ckpt):
    (ckpt / "config.json").write_text("{")
    with pytest.raises(CheckpointError, match=r"config\.json: not valid JSON"):
        load_model(ckpt)


def test_missing_tokenizer(ckpt):
    (ckpt / "tokenizer.json").unlink()
    with pytest.raises(CheckpointError, match=r"missing tokenizer\.json"):
        load_tokenizer(ckpt)


def test_shard_index_pointing_at_missing_file(ckpt):
    (ckpt / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"model.norm.weight": "model-00001-of-00002.safetensors"}})
    )
    with pytest.raises(CheckpointError, match=r"shard 'model-00001-of-00002\.safetensors'.*does not exist"):
        load_model(ckpt)


def test_unexpected_tensors_are_reported_not_fatal(ckpt, caplog):
    def add(t):
        t["model.layers.0.mlp.predictor.weight"] = torch.zeros(4, 4)
        t["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.zeros(8)

    edit_tensors(ckpt, add)
    load_model(ckpt)
    assert "model.layers.0.mlp.predictor.weight" in caplog.text
    assert "inv_freq" not in caplog.text
