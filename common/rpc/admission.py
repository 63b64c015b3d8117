"""Admission of every RPC before its handler runs: refuse new calls while the server drains (UNAVAILABLE), answer
a request that does not parse with INVALID_ARGUMENT (gRPC itself would say UNKNOWN), and count the calls in flight
so a drain knows when the last one has finished. Health checks and reflection are always answered, never counted.
"""
from __future__ import annotations

import asyncio
import contextlib

import grpc

from common.rpc.infra_methods import INFRA_METHOD_PREFIXES

DRAINING_MESSAGE = "server is draining (shutting down): it takes no new requests; retry on another replica"


class _Undecodable:
    """Stands in for a request whose bytes are not a valid message (bad UTF-8 in a string, corrupt wire data)."""
    __slots__ = ("message",)

    def __init__(self, message: str):
        self.message = message


def _lenient(deserializer):
    def parse(raw: bytes):
        try:
            return deserializer(raw) if deserializer is not None else raw
        except Exception as e:  # noqa: BLE001 - protobuf's DecodeError, whatever the runtime calls it
            return _Undecodable(f"request is not a valid message: {e}")
    return parse


class AdmissionInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self):
        self.draining = False
        self.in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()

    async def wait_idle(self, timeout_s: float) -> bool:
        """Wait until no counted RPC is in flight; False when `timeout_s` passed first."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout_s)
        except asyncio.TimeoutError:
            return False
        return True

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or handler_call_details.method.startswith(INFRA_METHOD_PREFIXES):
            return handler
        if handler.unary_unary is not None:
            make, behavior = grpc.unary_unary_rpc_method_handler, self._unary(handler.unary_unary)
        elif handler.unary_stream is not None:
            make, behavior = grpc.unary_stream_rpc_method_handler, self._stream(handler.unary_stream)
        else:
            return handler                                      # no client-streaming RPCs in specd.v1
        return make(behavior, request_deserializer=_lenient(handler.request_deserializer),
                    response_serializer=handler.response_serializer)

    async def _admit(self, request, context) -> None:
        if self.draining:
            await context.abort(grpc.StatusCode.UNAVAILABLE, DRAINING_MESSAGE)
        if isinstance(request, _Undecodable):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)
        # Counted until the RPC ends on the wire (status sent, or cancelled), not merely until the handler returns.
        self.enter()
        context.add_done_callback(lambda _context: self.leave())

    def enter(self) -> None:
        """Count one request in flight (an RPC, or a request of the gateway's HTTP door): a drain waits for it."""
        self.in_flight += 1
        self._idle.clear()

    def leave(self) -> None:
        self.in_flight -= 1
        if self.in_flight == 0:
            self._idle.set()

    def _unary(self, behavior):
        async def handle(request, context):
            await self._admit(request, context)
            return await behavior(request, context)
        return handle

    def _stream(self, behavior):
        async def handle(request, context):
            await self._admit(request, context)
            replies = behavior(request, context)
            if hasattr(replies, "__aiter__"):
                async with contextlib.aclosing(replies):        # closing this one closes the handler's too
                    async for reply in replies:
                        yield reply
            else:                                               # a handler that writes with context.write()
                await replies
        return handle
