"""Python client for the sparseinfer gRPC server (depends on grpcio + protobuf only).

``Client`` (blocking) and ``AsyncClient`` (asyncio) call Generate / GenerateStream / Tokenize / ModelInfo and
the standard health service, return the frozen dataclasses of ``types``, and raise the ``errors`` classes.
"""

from sparseinfer_client._channel import NO_RETRY, RetryPolicy
from sparseinfer_client.aio import AsyncClient
from sparseinfer_client.client import Client
from sparseinfer_client.errors import (
    Aborted,
    AlreadyExists,
    Cancelled,
    DataLoss,
    DeadlineExceeded,
    FailedPrecondition,
    NotFound,
    OutOfRange,
    OverloadedError,
    PermissionDenied,
    ServerError,
    SparseInferError,
    Unauthenticated,
    Unavailable,
    Unimplemented,
    UnknownError,
    ValidationError,
)
from sparseinfer_client.types import (
    GenerateResult,
    LayerSparsity,
    Limits,
    ModelInfo,
    Placement,
    SparsityReport,
    StreamChunk,
    Timings,
    Token,
    TokenizeResult,
    Usage,
)

__version__ = "0.1.0"

__all__ = [
    "NO_RETRY",
    "Aborted",
    "AlreadyExists",
    "AsyncClient",
    "Cancelled",
    "Client",
    "DataLoss",
    "DeadlineExceeded",
    "FailedPrecondition",
    "GenerateResult",
    "LayerSparsity",
    "Limits",
    "ModelInfo",
    "NotFound",
    "OutOfRange",
    "OverloadedError",
    "PermissionDenied",
    "Placement",
    "RetryPolicy",
    "ServerError",
    "SparseInferError",
    "SparsityReport",
    "StreamChunk",
    "Timings",
    "Token",
    "TokenizeResult",
    "Unauthenticated",
    "Unavailable",
    "Unimplemented",
    "UnknownError",
    "Usage",
    "ValidationError",
]
