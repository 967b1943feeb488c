"""The model runtime: config, the Llama-family decoder, FFN variants, checkpoint and tokenizer loading."""

from sparseinfer.model.config import ModelConfig
from sparseinfer.model.errors import CheckpointError
from sparseinfer.model.loader import load_model
from sparseinfer.model.tokenizer import IncrementalDecoder, Tokenizer, load_tokenizer
from sparseinfer.model.transformer import Transformer

__all__ = [
    "CheckpointError",
    "IncrementalDecoder",
    "ModelConfig",
    "Tokenizer",
    "Transformer",
    "load_model",
    "load_tokenizer",
]
