"""sparseinfer: serve activation-sparse LLMs faster than dense inference."""

__version__ = "0.1.0"
