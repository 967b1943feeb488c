"""One exception class per gRPC status, all under ``SparseInferError``.

The server maps its failures to gRPC statuses (INVALID_ARGUMENT for a bad field, RESOURCE_EXHAUSTED for a full
queue, ...); the client turns every non-OK status into the matching class below, so callers can write
``except OverloadedError:`` instead of comparing status codes.
"""

from __future__ import annotations

import grpc


class SparseInferError(Exception):
    """A call failed. ``code`` is the gRPC status (None for errors raised before any call was made, e.g. a
    prompt the client cannot encode) and ``details`` the server's message (it names the offending field for
    INVALID_ARGUMENT)."""

    default_code: grpc.StatusCode | None = None

    def __init__(self, details: str, code: grpc.StatusCode | None = None) -> None:
        self.code = code if code is not None else self.default_code
        self.details = details
        label = self.code.name if self.code is not None else "CLIENT"
        super().__init__(f"{label}: {details}")


class ValidationError(SparseInferError, ValueError):
    """INVALID_ARGUMENT: the request has a bad field (the message names it)."""

    default_code = grpc.StatusCode.INVALID_ARGUMENT


class OverloadedError(SparseInferError):
    """RESOURCE_EXHAUSTED: the server's queue is full; retry later. (gRPC also answers it for a request
    message over the server's ``ModelInfo.limits.max_message_bytes``, which no retry can fix.)"""

    default_code = grpc.StatusCode.RESOURCE_EXHAUSTED


class DeadlineExceeded(SparseInferError, TimeoutError):
    """DEADLINE_EXCEEDED: the call's timeout passed before the server answered."""

    default_code = grpc.StatusCode.DEADLINE_EXCEEDED


class Unauthenticated(SparseInferError):
    """UNAUTHENTICATED: the server requires a bearer token and got none or a wrong one."""

    default_code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDenied(SparseInferError):
    default_code = grpc.StatusCode.PERMISSION_DENIED


class Cancelled(SparseInferError):
    """CANCELLED: the call was cancelled (by this client, or by the server while shutting down)."""

    default_code = grpc.StatusCode.CANCELLED


class ServerError(SparseInferError):
    """INTERNAL: the engine failed on this request (other requests are unaffected)."""

    default_code = grpc.StatusCode.INTERNAL


class Unavailable(SparseInferError, ConnectionError):
    """UNAVAILABLE: no server is reachable, or it is shutting down. The client retries these (with
    exponential backoff) before raising, but only while no response message has arrived yet."""

    default_code = grpc.StatusCode.UNAVAILABLE


class Unimplemented(SparseInferError):
    default_code = grpc.StatusCode.UNIMPLEMENTED


class NotFound(SparseInferError):
    default_code = grpc.StatusCode.NOT_FOUND


class AlreadyExists(SparseInferError):
    default_code = grpc.StatusCode.ALREADY_EXISTS


class FailedPrecondition(SparseInferError):
    default_code = grpc.StatusCode.FAILED_PRECONDITION


class Aborted(SparseInferError):
    default_code = grpc.StatusCode.ABORTED


class OutOfRange(SparseInferError):
    default_code = grpc.StatusCode.OUT_OF_RANGE


class DataLoss(SparseInferError):
    default_code = grpc.StatusCode.DATA_LOSS


class UnknownError(SparseInferError):
    default_code = grpc.StatusCode.UNKNOWN


_BY_CODE: dict[grpc.StatusCode, type[SparseInferError]] = {
    cls.default_code: cls
    for cls in (
        ValidationError,
        OverloadedError,
        DeadlineExceeded,
        Unauthenticated,
        PermissionDenied,
        Cancelled,
        ServerError,
        Unavailable,
        Unimplemented,
        NotFound,
        AlreadyExists,
        FailedPrecondition,
        Aborted,
        OutOfRange,
        DataLoss,
        UnknownError,
    )
    if cls.default_code is not None
}


def error_class(code: grpc.StatusCode) -> type[SparseInferError]:
    """The exception class for a non-OK status."""
    if code == grpc.StatusCode.OK:
        raise ValueError("StatusCode.OK is not an error")
    return _BY_CODE[code]


def from_rpc_error(error: grpc.RpcError) -> SparseInferError:
    """Translate a failed call (sync ``grpc.RpcError`` or ``grpc.aio.AioRpcError``) into our exception."""
    code_fn = getattr(error, "code", None)
    code = code_fn() if callable(code_fn) else None
    details_fn = getattr(error, "details", None)
    details = (details_fn() if callable(details_fn) else None) or str(error)
    if not isinstance(code, grpc.StatusCode) or code == grpc.StatusCode.OK:
        return UnknownError(details)
    return error_class(code)(details, code)
