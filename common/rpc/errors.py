"""Engine exceptions -> gRPC status codes, in one place (servicers never choose codes themselves)."""
from __future__ import annotations

import grpc

from common.errors import (CheckpointError, ConfigError, KVCacheExhaustedError, SequenceTooLongError, SpecdError)


def status_for(exc: BaseException) -> grpc.StatusCode:
    name = type(exc).__name__
    if name in ("RoundMismatchError", "TokenizerMismatchError"):
        return grpc.StatusCode.FAILED_PRECONDITION
    if name == "UnknownSessionError":
        return grpc.StatusCode.NOT_FOUND
    if name.endswith("QueueFullError") or isinstance(exc, KVCacheExhaustedError):
        return grpc.StatusCode.RESOURCE_EXHAUSTED
    if isinstance(exc, (SequenceTooLongError, ConfigError, ValueError)):
        return grpc.StatusCode.INVALID_ARGUMENT
    if isinstance(exc, TimeoutError):
        return grpc.StatusCode.DEADLINE_EXCEEDED
    if isinstance(exc, (CheckpointError, SpecdError)):
        return grpc.StatusCode.FAILED_PRECONDITION
    return grpc.StatusCode.INTERNAL


async def abort_with(context, exc: BaseException):
    """Abort the RPC with the status that fits `exc` and its message (which names the field and limit)."""
    code = status_for(exc)
    message = str(exc) or type(exc).__name__
    if code is grpc.StatusCode.INTERNAL:
        message = f"internal error: {type(exc).__name__}: {message}"
    await context.abort(code, message)
