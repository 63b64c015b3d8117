"""gRPC client interceptors: one CLIENT span per RPC, its W3C context injected into the call's metadata.

`TracingAioClientInterceptor` is for the gateway's grpc.aio channels to the draft service and the verifier: it
only traces calls made inside a trace (a round), so start-up probes (Info) start no traces of their own.
`TracingClientInterceptor` is for the synchronous `SpecdClient`: its span is the root of a request's trace.
"""
from __future__ import annotations

import collections

import grpc
from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.trace import SpanKind, Status, StatusCode

from common.rpc.infra_methods import INFRA_METHOD_PREFIXES
from common.telemetry.server_interceptor import rpc_attributes


def _method_name(method) -> str:
    return method.decode() if isinstance(method, bytes) else method


def _end(span, code: grpc.StatusCode | None, details: str | None) -> None:
    code = code or grpc.StatusCode.UNKNOWN
    span.set_attribute("rpc.grpc.status_code", code.value[0])
    if code is not grpc.StatusCode.OK:
        span.set_status(Status(StatusCode.ERROR, f"{code.name}: {details or ''}"))
    span.end()


class _Traced:
    def __init__(self, tracer_provider, require_parent: bool):
        self.tracer = trace.get_tracer(__name__, tracer_provider=tracer_provider)
        self.require_parent = require_parent

    def _start(self, method: str):
        """(span, metadata to add) or (None, None) when this call is not traced."""
        if method.startswith(INFRA_METHOD_PREFIXES):
            return None, None
        if self.require_parent and not trace.get_current_span().get_span_context().is_valid:
            return None, None
        # Message sizes are on the server's span; the client's says when the call left and came back.
        span = self.tracer.start_span(method.lstrip("/"), kind=SpanKind.CLIENT, attributes=rpc_attributes(method))
        if not span.is_recording():
            return None, None
        carrier: dict[str, str] = {}
        propagate.inject(carrier, context=trace.set_span_in_context(span, otel_context.get_current()))
        return span, tuple(carrier.items())


class TracingAioClientInterceptor(_Traced, grpc.aio.UnaryUnaryClientInterceptor):
    def __init__(self, tracer_provider=None, require_parent: bool = True):
        super().__init__(tracer_provider, require_parent)

    async def intercept_unary_unary(self, continuation, details, request):
        span, extra = self._start(_method_name(details.method))
        if span is None:
            return await continuation(details, request)
        details = grpc.aio.ClientCallDetails(details.method, details.timeout,
                                             grpc.aio.Metadata(*(details.metadata or ()), *extra),
                                             details.credentials, details.wait_for_ready)
        try:
            call = await continuation(details, request)
            code = await call.code()
            _end(span, code, None if code is grpc.StatusCode.OK else await call.details())
        except BaseException as e:
            span.set_status(Status(StatusCode.ERROR, f"{type(e).__name__}: {e}"))
            span.end()
            raise
        return call


class _CallDetails(collections.namedtuple("_CallDetails", ("method", "timeout", "metadata", "credentials",
                                                           "wait_for_ready", "compression")),
                   grpc.ClientCallDetails):
    pass


class TracingClientInterceptor(_Traced, grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor):
    """For synchronous channels: `grpc.intercept_channel(channel, TracingClientInterceptor())`."""

    def __init__(self, tracer_provider=None, require_parent: bool = False):
        super().__init__(tracer_provider, require_parent)

    def _call(self, continuation, details, request):
        span, extra = self._start(_method_name(details.method))
        if span is None:
            return continuation(details, request)
        details = _CallDetails(details.method, details.timeout, (*(details.metadata or ()), *extra),
                               details.credentials, getattr(details, "wait_for_ready", None),
                               getattr(details, "compression", None))
        try:
            call = continuation(details, request)
        except BaseException as e:
            span.set_status(Status(StatusCode.ERROR, f"{type(e).__name__}: {e}"))
            span.end()
            raise
        call.add_done_callback(lambda c: _end(span, c.code(), c.details()))   # at once for a blocking call
        return call

    def intercept_unary_unary(self, continuation, client_call_details, request):
        return self._call(continuation, client_call_details, request)

    def intercept_unary_stream(self, continuation, client_call_details, request):
        return self._call(continuation, client_call_details, request)
