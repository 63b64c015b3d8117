"""A loopback grpc.aio server with the tracing interceptor and fake servicers (unary, streaming, health)."""
from __future__ import annotations

import grpc
from grpc_health.v1 import health, health_pb2_grpc
from opentelemetry import trace

from common.rpc.generated.specd.v1 import draft_pb2, draft_pb2_grpc, gateway_pb2, gateway_pb2_grpc
from common.telemetry.server_interceptor import TracingServerInterceptor


class FakeDraft(draft_pb2_grpc.DraftServiceServicer):
    async def Propose(self, request, context):
        if request.k == 99:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "k=99: must be in [1, 8]")
        trace.get_current_span().set_attribute("specd.k", request.k)      # what the real servicers do
        return draft_pb2.ProposeReply(token_ids=[7] * request.k, batch_size=1)


class FakeGateway(gateway_pb2_grpc.GatewayServicer):
    async def GenerateStream(self, request, context):
        for i in range(3):
            yield gateway_pb2.GenerateChunk(text=f"t{i}", token_ids=[i])


async def start_server(provider) -> tuple[grpc.aio.Server, str]:
    server = grpc.aio.server(interceptors=[TracingServerInterceptor(provider)])
    draft_pb2_grpc.add_DraftServiceServicer_to_server(FakeDraft(), server)
    gateway_pb2_grpc.add_GatewayServicer_to_server(FakeGateway(), server)
    health_pb2_grpc.add_HealthServicer_to_server(health.aio.HealthServicer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, f"127.0.0.1:{port}"
