"""The server interceptor reads a W3C `traceparent` from any client, and leaves health checks alone."""
import asyncio

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from opentelemetry.trace import SpanKind

from common.rpc.generated.specd.v1 import draft_pb2, draft_pb2_grpc
from common.telemetry.server_interceptor import server_interceptors
from tests.common.telemetry.loopback import start_server

TRACE_ID, PARENT_ID = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"


def test_a_plain_client_with_a_traceparent_header_is_joined(provider, exporter):
    async def scenario():
        server, target = await start_server(provider)
        async with grpc.aio.insecure_channel(target) as ch:           # no interceptor: any W3C-speaking client
            await draft_pb2_grpc.DraftServiceStub(ch).Propose(
                draft_pb2.ProposeRequest(context_token_ids=[1], k=1),
                metadata=(("traceparent", f"00-{TRACE_ID}-{PARENT_ID}-01"),))
            await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(),
                                                        metadata=(("traceparent", f"00-{TRACE_ID}-{PARENT_ID}-01"),))
        await server.stop(0)

    asyncio.run(scenario())
    [span] = exporter.get_finished_spans()                            # Propose only: health is not traced
    assert span.kind is SpanKind.SERVER and span.name == "specd.v1.DraftService/Propose"
    assert format(span.context.trace_id, "032x") == TRACE_ID
    assert format(span.parent.span_id, "016x") == PARENT_ID
    assert span.attributes["rpc.service"] == "specd.v1.DraftService" and span.attributes["rpc.method"] == "Propose"


def test_no_interceptors_when_tracing_is_off(provider):
    assert server_interceptors(None) == []
    assert len(server_interceptors(provider)) == 1
