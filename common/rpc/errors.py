"""Engine exceptions -> gRPC status codes, in one place, by type (servicers never choose codes themselves)."""
from __future__ import annotations

import grpc

from common.errors import (ConfigError, EngineStoppedError, KVCacheExhaustedError, QueueFullError,
                           RoundMismatchError, SequenceTooLongError, SpecdError, TokenizerMismatchError,
                           UnknownSessionError)

# First match wins: specific types before the bases they share (ConfigError is a ValueError, all are SpecdError).
_CODES: tuple[tuple[type[BaseException] | tuple[type[BaseException], ...], grpc.StatusCode], ...] = (
    ((RoundMismatchError, TokenizerMismatchError), grpc.StatusCode.FAILED_PRECONDITION),
    (UnknownSessionError, grpc.StatusCode.NOT_FOUND),
    ((QueueFullError, KVCacheExhaustedError), grpc.StatusCode.RESOURCE_EXHAUSTED),
    (EngineStoppedError, grpc.StatusCode.UNAVAILABLE),
    ((SequenceTooLongError, ConfigError, ValueError), grpc.StatusCode.INVALID_ARGUMENT),
    (TimeoutError, grpc.StatusCode.DEADLINE_EXCEEDED),
    (SpecdError, grpc.StatusCode.FAILED_PRECONDITION),      # CheckpointError, UnsupportedModelError, ...
)


def status_for(exc: BaseException) -> grpc.StatusCode:
    for types, code in _CODES:
        if isinstance(exc, types):
            return code
    return grpc.StatusCode.INTERNAL


REASON_KEY = "specd-reason"       # trailing metadata of a failed call: the error type's stable `reason`


def reason_of(err: grpc.RpcError) -> str | None:
    """The `specd-reason` a specd service attached to a failed call, if any."""
    trailing = err.trailing_metadata() or ()
    return next((value for key, value in trailing if key == REASON_KEY), None)


async def abort_with(context, exc: BaseException):
    """Abort the RPC with the status that fits `exc`, its message (which names the field and limit) and, for
    specd's own errors, their `reason` in the trailing metadata."""
    code = status_for(exc)
    message = str(exc) or type(exc).__name__
    if code is grpc.StatusCode.INTERNAL:
        message = f"internal error: {type(exc).__name__}: {message}"
    trailing = ((REASON_KEY, exc.reason),) if isinstance(exc, SpecdError) else ()
    await context.abort(code, message, trailing_metadata=trailing)
