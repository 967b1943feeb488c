"""Shared fixtures: tiny checkpoints on disk, written fresh per test session (no hub downloads).

Fixtures (names are stable; other test packages use them):

- ``make_hf_checkpoint(arch="llama", dtype=torch.float32, max_shard_size=None, seed=0, **config_overrides) ->
  Path`` A factory. Builds a tiny random ``transformers`` ``LlamaForCausalLM`` (``arch="llama"``) or
  ``MistralForCausalLM`` (``arch="mistral"``) - hidden 64, 2 layers, 4 heads, 2 kv heads, intermediate 128,
  vocab 512 unless overridden by ``config_overrides`` (any ``LlamaConfig``/``MistralConfig`` keyword, e.g.
  ``hidden_act="relu2"``, ``tie_word_embeddings=True``, ``rope_parameters={...}``) - saves it with
  ``save_pretrained`` (sharded when ``max_shard_size`` is given, e.g. ``"20KB"``) into a fresh temporary
  directory, adds a byte-level ``tokenizer.json`` (``<s>``=0 is BOS, ``</s>``=1 is EOS) and returns the
  directory. Load the HF model back with ``transformers.AutoModelForCausalLM.from_pretrained(path)``.
- ``tiny_llama_checkpoint -> Path``: session-scoped ``make_hf_checkpoint()`` result (SwiGLU, GQA, fp32).
- ``tiny_random_checkpoint -> Path``: session-scoped
  ``sparseinfer.model.random_checkpoint.write_random_checkpoint`` result (non-gated ReLU², fp32); needs no
  transformers.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

from sparseinfer.model.random_checkpoint import build_tokenizer, write_random_checkpoint

TINY_HF_CONFIG = dict(
    vocab_size=512,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    initializer_range=0.1,  # not the default 0.02: peaked logits, so greedy decoding has no near-ties
    rms_norm_eps=1e-6,
    bos_token_id=0,
    eos_token_id=1,
)


def _build_hf_checkpoint(
    directory: Path,
    arch: str = "llama",
    dtype: torch.dtype = torch.float32,
    max_shard_size: str | None = None,
    seed: int = 0,
    **config_overrides,
) -> Path:
    import transformers  # a test-only dependency

    classes = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
    }
    config_cls, model_cls = classes[arch]
    config = config_cls(**{**TINY_HF_CONFIG, **config_overrides})
    torch.manual_seed(seed)
    model = model_cls(config)
    with torch.no_grad():  # HF initialises norms to ones; perturb them so that loading them is tested too
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    model = model.to(dtype)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(directory, **kwargs)
    build_tokenizer(config.vocab_size).save(str(directory / "tokenizer.json"))
    return directory


@pytest.fixture
def make_hf_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    def make(**kwargs) -> Path:
        return _build_hf_checkpoint(tmp_path_factory.mktemp("hf_checkpoint"), **kwargs)

    return make


@pytest.fixture(scope="session")
def tiny_llama_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _build_hf_checkpoint(tmp_path_factory.mktemp("tiny_llama"))


@pytest.fixture(scope="session")
def tiny_random_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_random_checkpoint(tmp_path_factory.mktemp("tiny_random"))


@pytest.fixture(scope="session", autouse=True)
def _session_cache_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Caches the code writes (the dense-linear calibration: model.linear_calibration) go to a directory of
    this session, never to the user's ~/.cache; servers the tests start inherit it."""
    before = os.environ.get("XDG_CACHE_HOME")
    os.environ["XDG_CACHE_HOME"] = str(tmp_path_factory.mktemp("cache-home"))
    yield
    if before is None:
        del os.environ["XDG_CACHE_HOME"]
    else:
        os.environ["XDG_CACHE_HOME"] = before
