"""A grpc.aio server interceptor: one SERVER span per RPC, parented by the W3C context in the call's metadata.

Health checks and reflection are not traced. The span is current while the handler runs, so a servicer adds
its own attributes with `trace.get_current_span()` and work it queues can carry `context.get_current()`.
"""
from __future__ import annotations

import asyncio

import grpc
from opentelemetry import propagate, trace
from opentelemetry.trace import SpanKind, Status, StatusCode

from common.rpc.infra_methods import INFRA_METHOD_PREFIXES


def rpc_attributes(method: str) -> dict:
    service, _, name = method.lstrip("/").partition("/")
    return {"rpc.system": "grpc", "rpc.service": service, "rpc.method": name}


def _finish(span, code: grpc.StatusCode | None, details: str | None = None) -> None:
    code = code or grpc.StatusCode.OK
    span.set_attribute("rpc.grpc.status_code", code.value[0])
    if code is not grpc.StatusCode.OK:
        span.set_status(Status(StatusCode.ERROR, f"{code.name}: {details or ''}".rstrip(": ")))


def _failure_code(context, exc: BaseException) -> grpc.StatusCode:
    if isinstance(exc, (asyncio.CancelledError, GeneratorExit)):
        return grpc.StatusCode.CANCELLED                    # the client went away
    return _code(context) or grpc.StatusCode.UNKNOWN


def _code(context) -> grpc.StatusCode | None:
    try:
        return context.code()
    except (AttributeError, NotImplementedError):
        return None


class TracingServerInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, tracer_provider=None):
        self.tracer = trace.get_tracer(__name__, tracer_provider=tracer_provider)

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or method.startswith(INFRA_METHOD_PREFIXES):
            return handler
        parent = propagate.extract(dict(handler_call_details.invocation_metadata or ()))
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                self._unary(handler.unary_unary, method, parent),
                request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer)
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(
                self._stream(handler.unary_stream, method, parent),
                request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer)
        return handler                                      # no client-streaming RPCs in specd.v1

    def _start(self, method: str, parent, request):
        attributes = rpc_attributes(method)
        attributes["rpc.request.bytes"] = request.ByteSize()
        return self.tracer.start_as_current_span(method.lstrip("/"), context=parent, kind=SpanKind.SERVER,
                                                 attributes=attributes, record_exception=False,
                                                 set_status_on_exception=False)

    def _unary(self, behavior, method: str, parent):
        async def handle(request, context):
            with self._start(method, parent, request) as span:
                try:
                    reply = await behavior(request, context)
                except BaseException as e:
                    _finish(span, _failure_code(context, e), _details(context, e))
                    raise
                span.set_attribute("rpc.response.bytes", reply.ByteSize() if reply is not None else 0)
                _finish(span, _code(context), _details(context, None))
                return reply
        return handle

    def _stream(self, behavior, method: str, parent):
        async def handle(request, context):
            with self._start(method, parent, request) as span:
                sent = 0
                try:
                    async for reply in behavior(request, context):
                        sent += reply.ByteSize()
                        yield reply
                except BaseException as e:
                    _finish(span, _failure_code(context, e), _details(context, e))
                    raise
                finally:
                    span.set_attribute("rpc.response.bytes", sent)
                _finish(span, _code(context), _details(context, None))
        return handle


def _details(context, exc: BaseException | None) -> str | None:
    try:
        details = context.details()
    except (AttributeError, NotImplementedError):
        details = None
    if isinstance(details, bytes):
        details = details.decode(errors="replace")
    return details or (f"{type(exc).__name__}: {exc}" if exc is not None else None)


def server_interceptors(tracer_provider) -> list:
    """The interceptors a ServiceHost needs: none when tracing is off (setup_tracing returned None)."""
    return [TracingServerInterceptor(tracer_provider)] if tracer_provider is not None else []
