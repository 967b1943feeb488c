"""Loading: zero-copy mmap, dtypes, sharded checkpoints, tied embeddings, the safetensors reader itself."""

from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import save_file

from sparseinfer.model import load_model
from sparseinfer.model.random_checkpoint import write_random_checkpoint
from sparseinfer.model.safetensors_io import CheckpointTensors, SafetensorsFile


def file_mappings(path) -> list[tuple[int, int]]:
    """Address ranges where this process has ``path`` memory-mapped (Linux /proc/self/maps)."""
    ranges = []
    with open("/proc/self/maps") as maps:
        lines = maps.readlines()
    for line in lines:
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[5].strip() == str(path.resolve()):
            lo, hi = (int(x, 16) for x in fields[0].split("-"))
            ranges.append((lo, hi))
    return ranges


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="needs Linux /proc")
def test_tensors_are_not_copied(tiny_random_checkpoint):
    """In the checkpoint's own dtype on the CPU, every parameter's memory is the file mapping itself."""
    model = load_model(tiny_random_checkpoint)
    ranges = file_mappings(tiny_random_checkpoint / "model.safetensors")
    assert ranges
    for name, p in model.named_parameters():
        assert any(lo <= p.data_ptr() < hi for lo, hi in ranges), name
    # the reader's own report agrees
    f = SafetensorsFile(tiny_random_checkpoint / "model.safetensors")
    lo, hi = f.buffer_range()
    assert lo <= f.tensor("model.norm.weight").data_ptr() < hi
    # the mapping is private: writing a parameter must not change the file
    before = (tiny_random_checkpoint / "model.safetensors").read_bytes()
    with torch.no_grad():
        model.norm.weight.add_(1.0)
    assert (tiny_random_checkpoint / "model.safetensors").read_bytes() == before


def test_dtype_conversion_only_when_asked(tiny_random_checkpoint):
    model = load_model(tiny_random_checkpoint, dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_checkpoints_run_close_to_fp32(tmp_path, dtype):
    path = write_random_checkpoint(tmp_path, dtype=dtype, activation="silu", gated=True)
    model = load_model(path)
    assert model.dtype == dtype  # the checkpoint's dtype by default
    reference = load_model(path, dtype=torch.float32)
    tokens = torch.randint(2, 500, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        got, expected = model(tokens), reference(tokens)
        assert got.dtype == torch.float32
        assert (got - expected).abs().max() < 0.05 * expected.abs().max()
        cache = model.new_cache(max_batch=2, max_seq=16)
        slots = torch.tensor([cache.allocate(), cache.allocate()])
        pieces = [model(tokens[:, :8], cache, slots), model(tokens[:, 8:], cache, slots)]
        assert (torch.cat(pieces, 1) - got).abs().max() < 0.05 * expected.abs().max()


def test_sharded_checkpoint(make_hf_checkpoint):
    path = make_hf_checkpoint(max_shard_size="40KB")
    assert (path / "model.safetensors.index.json").is_file()
    sharded = CheckpointTensors(path)
    assert len(sharded.files) > 1
    model = load_model(path)
    tokens = torch.randint(2, 500, (1, 6))
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoModelForCausalLM.from_pretrained(path)
    with torch.inference_mode():
        assert (model(tokens) - hf(tokens).logits).abs().max() < 1e-4


def test_tied_embeddings_share_storage(tmp_path):
    model = load_model(write_random_checkpoint(tmp_path, tie=True))
    assert model.lm_head.weight is model.embed_tokens.weight


def test_safetensors_reader_roundtrip(tmp_path):
    tensors = {
        "f32": torch.randn(3, 5),
        "bf16": torch.randn(7).to(torch.bfloat16),
        "f16": torch.randn(2, 2, 2).half(),
        "i64": torch.arange(5),
        "i32": torch.arange(4, dtype=torch.int32),
        "u8": torch.arange(3, dtype=torch.uint8),
        "bool": torch.tensor([True, False, True]),
        "empty": torch.zeros(0, 4),
        "scalar": torch.tensor(2.5),
    }
    save_file(tensors, str(tmp_path / "x.safetensors"))
    f = SafetensorsFile(tmp_path / "x.safetensors")
    assert set(f.keys()) == set(tensors)
    for name, t in tensors.items():
        got = f.tensor(name)
        assert got.dtype == t.dtype and got.shape == t.shape, name
        assert torch.equal(got, t), name
