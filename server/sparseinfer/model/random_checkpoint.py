"""Write a tiny random Llama-family checkpoint (config.json, model.safetensors, tokenizer.json) without
transformers.

For demos until a real model is bundled, and for tests of components that need some model but not a good one.
The weights are random, so the text is gibberish; the format is exactly what a Hugging Face checkpoint looks
like, so everything downstream (loader, tokenizer, server) runs its real code path.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

BOS, EOS = "<s>", "</s>"

_CORPUS = """\
The quick brown fox jumps over the lazy dog. A language model predicts the next token from the ones before.
Most neurons of a feed-forward layer stay quiet for any given token, so a sparse kernel can skip them.
The hot neurons live on the fast device and the long cold tail on the slow one; both compute at the same time.
Once upon a time there was a small model that wanted to run fast on every machine it met, large or small.
Numbers like 0 1 2 3 4 5 6 7 8 9 and punctuation such as , . ; : ! ? ( ) " ' - also appear in ordinary text.
"""


def build_tokenizer(vocab_size: int) -> Tokenizer:
    """A byte-level BPE tokenizer (any text encodes), <s>=0 and </s>=1, vocab at most ``vocab_size``."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab_size < len(alphabet) + 2:
        raise ValueError(f"vocab_size must be at least {len(alphabet) + 2} for a byte-level tokenizer")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[BOS, EOS], initial_alphabet=alphabet, show_progress=False
    )
    tok.train_from_iterator(_CORPUS.splitlines(), trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, 0), (EOS, 1)]
    )
    return tok


def write_random_checkpoint(
    path: str | Path,
    *,
    hidden: int = 64,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    intermediate: int = 256,
    vocab: int = 512,
    activation: str = "relu2",
    gated: bool = False,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    tie: bool = False,
    max_position_embeddings: int = 2048,
    std: float = 0.1,
    extra_config: dict[str, Any] | None = None,
) -> Path:
    """Write a random checkpoint into directory ``path`` (created if needed) and return it.

    ``activation`` is the config's ``hidden_act`` (silu, relu, relu2, fatrelu, drelu); non-gated FFNs store
    their single in-projection as ``gate_proj``, like the paper's checkpoints. ``extra_config`` entries are
    merged into config.json last (e.g. MiniCPM's ``scale_emb``).
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    head_dim = hidden // heads
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen) * std).to(dtype)

    tensors = {
        "model.embed_tokens.weight": randn(vocab, hidden),
        "model.norm.weight": torch.ones(hidden, dtype=dtype),
    }
    for i in range(layers):
        p = f"model.layers.{i}."
        tensors[p + "input_layernorm.weight"] = torch.ones(hidden, dtype=dtype)
        tensors[p + "post_attention_layernorm.weight"] = torch.ones(hidden, dtype=dtype)
        tensors[p + "self_attn.q_proj.weight"] = randn(heads * head_dim, hidden)
        tensors[p + "self_attn.k_proj.weight"] = randn(kv_heads * head_dim, hidden)
        tensors[p + "self_attn.v_proj.weight"] = randn(kv_heads * head_dim, hidden)
        tensors[p + "self_attn.o_proj.weight"] = randn(hidden, heads * head_dim)
        tensors[p + "mlp.gate_proj.weight"] = randn(intermediate, hidden)
        if gated:
            tensors[p + "mlp.up_proj.weight"] = randn(intermediate, hidden)
        tensors[p + "mlp.down_proj.weight"] = randn(hidden, intermediate)
    if not tie:
        tensors["lm_head.weight"] = randn(vocab, hidden)
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})

    config: dict[str, Any] = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": intermediate,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "hidden_act": activation,
        "rms_norm_eps": 1e-6,
        "max_position_embeddings": max_position_embeddings,
        "rope_theta": 10000.0,
        "tie_word_embeddings": tie,
        "bos_token_id": 0,
        "eos_token_id": 1,
        "torch_dtype": str(dtype).removeprefix("torch."),
    }
    config.update(extra_config or {})
    (path / "config.json").write_text(json.dumps(config, indent=2))
    build_tokenizer(vocab).save(str(path / "tokenizer.json"))
    return path
