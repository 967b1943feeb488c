"""Stacked projections (model.linear.stacked, Attention.fuse_qkv, FFN.fuse_gate_up): one weight and one call
where there were several, with outputs unchanged: bit for bit through our row kernels and quantized kernels,
which compute each row on its own."""

import pytest
import torch

from sparseinfer.engine.factory import EngineConfig, load_engine
from sparseinfer.engine.placement import BYTES_PER_WEIGHT
from sparseinfer.model import linear as lin
from sparseinfer.model import load_model
from sparseinfer.model.ffn import FFN
from sparseinfer.model.quant import QuantizedLinear
from sparseinfer.model.transformer import stack_projections


def _linears(sizes, d, bias, dtype):
    gen = torch.Generator().manual_seed(0)
    parts = []
    for out in sizes:
        p = lin.Linear(d, out, bias=bias).to(dtype)
        with torch.no_grad():
            p.weight.copy_(torch.randn(out, d, generator=gen) / d**0.5)
            if bias:
                p.bias.copy_(torch.randn(out, generator=gen))
        p.rows_up_to = lin.EVERY_INPUT
        parts.append(p)
    return parts


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("fmt", ["none", "q8_0", "q4_0"])
def test_stacked_equals_its_parts_bit_for_bit(bias, fmt) -> None:
    parts = _linears((64, 32, 32), 96, bias, torch.bfloat16)
    fused = lin.stacked(tuple(parts))
    assert fused.weight.shape == (128, 96) and fused.rows_up_to == lin.EVERY_INPUT
    if fmt != "none":
        parts = [QuantizedLinear(p.weight, p.bias, fmt, hugepages=False) for p in parts]
        fused = QuantizedLinear(fused.weight, fused.bias, fmt, hugepages=False)
    x = torch.randn(5, 1, 96).bfloat16()
    with torch.no_grad():
        assert torch.equal(fused(x), torch.cat([p(x) for p in parts], dim=-1))


def _greedy_logits(model, prompt, steps):
    cache = model.new_cache(max_batch=2, max_seq=prompt.shape[1] + steps)
    cache.allocate()  # a non-zero slot
    slot = torch.tensor([cache.allocate()])
    out = [model(prompt, cache, slot, last_only=True)]
    for _ in range(steps):
        out.append(model(out[-1].argmax(-1), cache, slot))
    return torch.cat(out, dim=1)


@pytest.mark.parametrize("attention_bias", [False, True])
def test_fuse_qkv_leaves_decoding_unchanged(make_hf_checkpoint, attention_bias) -> None:
    path = make_hf_checkpoint(attention_bias=attention_bias)
    model = load_model(path, dtype=torch.bfloat16, dense_linear="rows")
    prompt = torch.tensor([[5, 9, 2, 7]])
    with torch.no_grad():
        before = _greedy_logits(model, prompt, 6)
        stack_projections(model)
        after = _greedy_logits(model, prompt, 6)
    names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    assert "qkv_proj" in names and not names & {"q_proj", "k_proj", "v_proj"}
    assert torch.equal(after, before)


def test_fuse_gate_up_leaves_decoding_unchanged(tiny_llama_checkpoint) -> None:
    model = load_model(tiny_llama_checkpoint, dtype=torch.bfloat16, dense_linear="rows")
    prompt = torch.tensor([[5, 9, 2, 7]])
    with torch.no_grad():
        before = _greedy_logits(model, prompt, 6)
        for module in model.modules():
            if isinstance(module, FFN):
                module.fuse_gate_up()
        after = _greedy_logits(model, prompt, 6)
    mlp = model.layers[0].mlp
    assert mlp.gate_up_proj is not None and mlp.up_proj is None and not hasattr(mlp, "gate_proj")
    assert torch.equal(after, before)


def test_engine_loads_fused_quantized_projections(tiny_llama_checkpoint) -> None:
    engine = load_engine(tiny_llama_checkpoint, EngineConfig(max_seq=32, weights="q8_0"))
    layer, d = engine.model.layers[0], engine.model.config.hidden_size
    assert isinstance(layer.self_attn.qkv_proj, QuantizedLinear) and layer.self_attn.qkv_proj.fmt == "q8_0"
    assert not hasattr(layer.self_attn, "q_proj")
    assert isinstance(layer.mlp.gate_up_proj, QuantizedLinear) and layer.mlp.gate_up_proj.fmt == "q8_0"
    # The sparsity report's byte counts still see a gated q8_0 FFN: gate, up and down rows per neuron.
    assert engine._neuron_bytes[0] == round(3 * d * BYTES_PER_WEIGHT["q8_0"])
