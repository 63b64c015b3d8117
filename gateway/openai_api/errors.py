"""Errors of the HTTP door in OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`, with the HTTP
status that fits, chosen here by exception type (the gRPC door's codes come from common/rpc/errors.py by the
same types)."""
from __future__ import annotations

import re
from dataclasses import dataclass

import grpc

from common.errors import (EngineStoppedError, KVCacheExhaustedError, QueueFullError, SequenceTooLongError,
                           SpecdError)
from common.rpc.errors import status_for
from gateway.openai_api.protocol import FieldError

_FIELD = re.compile(r"^([A-Za-z_][\w.\[\]]*)[=:]")


@dataclass(slots=True)
class HttpError(Exception):
    status: int
    message: str
    type: str = "invalid_request_error"
    param: str | None = None
    code: str | None = None

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code if self.code is not None else self.status}}


def unauthorized() -> HttpError:
    return HttpError(401, "missing or invalid API key: send 'Authorization: Bearer <key>'", "authentication_error",
                     code="invalid_api_key")


def rate_limited(describe: str) -> HttpError:
    return HttpError(429, f"rate limit: {describe}; retry later", "rate_limit_error", code="rate_limit_exceeded")


def draining(message: str) -> HttpError:
    return HttpError(503, message, "service_unavailable", code="draining")


def not_found(message: str, param: str | None = None) -> HttpError:
    return HttpError(404, message, "not_found_error", param, code="model_not_found" if param == "model" else None)


# gRPC status of a downstream service (the verifier) -> HTTP status and OpenAI error type
_FROM_GRPC = {
    grpc.StatusCode.INVALID_ARGUMENT: (400, "invalid_request_error"),
    grpc.StatusCode.RESOURCE_EXHAUSTED: (429, "rate_limit_error"),
    grpc.StatusCode.UNAVAILABLE: (503, "service_unavailable"),
    grpc.StatusCode.DEADLINE_EXCEEDED: (503, "service_unavailable"),
    grpc.StatusCode.NOT_FOUND: (404, "not_found_error"),
    grpc.StatusCode.UNAUTHENTICATED: (401, "authentication_error"),
    grpc.StatusCode.PERMISSION_DENIED: (403, "permission_error"),
}


def http_error_for(e: BaseException) -> HttpError:
    """The HTTP error that fits an exception raised while reading or running a request."""
    if isinstance(e, HttpError):
        return e
    if isinstance(e, FieldError):
        return HttpError(400, str(e), param=e.param)
    if isinstance(e, SequenceTooLongError):
        return HttpError(413, str(e), param=_param(str(e)), code="context_length_exceeded")
    if isinstance(e, (QueueFullError, KVCacheExhaustedError)):
        return HttpError(429, str(e), "rate_limit_error", code=e.reason.lower())
    if isinstance(e, EngineStoppedError):
        return HttpError(503, str(e), "service_unavailable", code=e.reason.lower())
    if isinstance(e, grpc.aio.AioRpcError):
        status, kind = _FROM_GRPC.get(e.code(), (500, "internal_error"))
        what = "verifier unavailable: the request was stopped; retry it" if status == 503 else "upstream error"
        return HttpError(status, f"{what} ({e.code().name}: {e.details()})", kind)
    if isinstance(e, ValueError):
        return HttpError(400, str(e), param=_param(str(e)))
    code = status_for(e)
    if isinstance(e, SpecdError):
        return HttpError(500, str(e), "internal_error", code=e.reason.lower())
    return HttpError(500, f"internal error: {type(e).__name__}: {e}", "internal_error", code=code.name.lower())


def _param(message: str) -> str | None:
    m = _FIELD.match(message)
    return m.group(1) if m else None
