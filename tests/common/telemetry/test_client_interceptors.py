"""Client interceptor → metadata → server interceptor on loopback: the server span is the client span's child."""
import asyncio

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from opentelemetry.trace import SpanKind, StatusCode

from common.rpc.generated.specd.v1 import draft_pb2, draft_pb2_grpc, gateway_pb2, gateway_pb2_grpc
from common.telemetry.client_interceptors import TracingAioClientInterceptor, TracingClientInterceptor
from tests.common.telemetry.loopback import start_server

PROPOSE = "specd.v1.DraftService/Propose"


def by_kind(spans, kind):
    return [s for s in spans if s.kind is kind]


def test_aio_client_span_parents_the_server_span_inside_a_round(provider, exporter):
    async def scenario():
        server, target = await start_server(provider)
        async with grpc.aio.insecure_channel(target, interceptors=[TracingAioClientInterceptor(provider)]) as ch:
            with provider.get_tracer("test").start_as_current_span("round") as round_span:
                reply = await draft_pb2_grpc.DraftServiceStub(ch).Propose(
                    draft_pb2.ProposeRequest(context_token_ids=[1, 2, 3], k=3))
        await server.stop(0)
        return reply, round_span

    reply, round_span = asyncio.run(scenario())
    assert list(reply.token_ids) == [7, 7, 7]
    spans = exporter.get_finished_spans()
    [client], [server] = by_kind(spans, SpanKind.CLIENT), by_kind(spans, SpanKind.SERVER)
    assert client.name == server.name == PROPOSE
    trace_id = round_span.get_span_context().trace_id
    assert client.context.trace_id == server.context.trace_id == trace_id
    assert client.parent.span_id == round_span.get_span_context().span_id
    assert server.parent.span_id == client.context.span_id and server.parent.is_remote
    assert server.attributes["specd.k"] == 3                         # set by the servicer on the current span
    assert server.attributes["rpc.grpc.status_code"] == 0 and client.attributes["rpc.grpc.status_code"] == 0
    assert server.attributes["rpc.request.bytes"] == draft_pb2.ProposeRequest(context_token_ids=[1, 2, 3],
                                                                             k=3).ByteSize()
    assert server.attributes["rpc.response.bytes"] == reply.ByteSize() > 0


def test_aio_client_outside_a_trace_and_health_checks_start_no_spans(provider, exporter):
    async def scenario():
        server, target = await start_server(provider)
        async with grpc.aio.insecure_channel(target, interceptors=[TracingAioClientInterceptor(provider)]) as ch:
            await draft_pb2_grpc.DraftServiceStub(ch).Propose(draft_pb2.ProposeRequest(context_token_ids=[1], k=1))
            await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest())
        await server.stop(0)

    asyncio.run(scenario())
    spans = exporter.get_finished_spans()
    assert not by_kind(spans, SpanKind.CLIENT)                        # start-up probes etc. are not traced
    [server] = spans                                                 # the server still traces Propose, not Check
    assert server.name == PROPOSE and server.parent is None


def test_error_status_is_recorded_on_both_sides(provider, exporter):
    async def scenario():
        server, target = await start_server(provider)
        async with grpc.aio.insecure_channel(target, interceptors=[TracingAioClientInterceptor(provider)]) as ch:
            with provider.get_tracer("test").start_as_current_span("round"):
                try:
                    await draft_pb2_grpc.DraftServiceStub(ch).Propose(draft_pb2.ProposeRequest(k=99))
                except grpc.aio.AioRpcError as e:
                    code = e.code()
        await server.stop(0)
        return code

    assert asyncio.run(scenario()) is grpc.StatusCode.INVALID_ARGUMENT
    spans = exporter.get_finished_spans()
    pair = by_kind(spans, SpanKind.CLIENT) + by_kind(spans, SpanKind.SERVER)
    assert len(pair) == 2
    for span in pair:
        assert span.attributes["rpc.grpc.status_code"] == grpc.StatusCode.INVALID_ARGUMENT.value[0]
        assert span.status.status_code is StatusCode.ERROR and "k=99" in span.status.description


def test_sync_client_starts_the_trace_for_unary_and_streaming_calls(provider, exporter):
    def calls(target):
        with grpc.insecure_channel(target) as raw:
            ch = grpc.intercept_channel(raw, TracingClientInterceptor(provider))
            reply = draft_pb2_grpc.DraftServiceStub(ch).Propose(draft_pb2.ProposeRequest(context_token_ids=[1], k=2))
            chunks = list(gateway_pb2_grpc.GatewayStub(ch).GenerateStream(gateway_pb2.GenerateRequest(prompt="x")))
        return reply, chunks

    async def scenario():
        server, target = await start_server(provider)
        result = await asyncio.to_thread(calls, target)
        await server.stop(0)
        return result

    reply, chunks = asyncio.run(scenario())
    assert len(reply.token_ids) == 2 and [c.text for c in chunks] == ["t0", "t1", "t2"]
    spans = exporter.get_finished_spans()
    clients, servers = by_kind(spans, SpanKind.CLIENT), by_kind(spans, SpanKind.SERVER)
    assert sorted(s.name for s in clients) == sorted(s.name for s in servers) == [
        "specd.v1.DraftService/Propose", "specd.v1.Gateway/GenerateStream"]
    for client in clients:
        assert client.parent is None                                  # each call is the root of its own trace
        [server] = [s for s in servers if s.name == client.name]
        assert server.parent.span_id == client.context.span_id
        assert server.context.trace_id == client.context.trace_id
    stream = next(s for s in servers if s.name.endswith("GenerateStream"))
    assert stream.attributes["rpc.response.bytes"] == sum(c.ByteSize() for c in chunks)
