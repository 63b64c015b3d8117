"""A real OTLP/gRPC trace receiver (the protocol Jaeger speaks on 4317), for tests that export spans over the wire."""
from __future__ import annotations

import threading
import time
from concurrent import futures
from dataclasses import dataclass

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.trace.v1 import trace_pb2

SERVER, CLIENT, INTERNAL = trace_pb2.Span.SPAN_KIND_SERVER, trace_pb2.Span.SPAN_KIND_CLIENT, \
    trace_pb2.Span.SPAN_KIND_INTERNAL


@dataclass(frozen=True)
class ReceivedSpan:
    service: str                # the exporting process's resource service.name
    name: str
    kind: int
    trace_id: str
    span_id: str
    parent_id: str              # "" for a root span
    attributes: dict
    status_code: int            # 0 unset, 1 ok, 2 error


def _value(v):
    which = v.WhichOneof("value")
    return getattr(v, which) if which else None


class OtlpReceiver(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self, host: str = "127.0.0.1"):
        self._spans: list[ReceivedSpan] = []
        self._lock = threading.Lock()
        self.server = grpc.server(futures.ThreadPoolExecutor(4))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(self, self.server)
        self.port = self.server.add_insecure_port(f"{host}:0")
        self.endpoint = f"http://{host}:{self.port}"
        self.server.start()

    def Export(self, request, context):
        spans = []
        for rs in request.resource_spans:
            service = next((_value(a.value) for a in rs.resource.attributes if a.key == "service.name"), "")
            for ss in rs.scope_spans:
                for s in ss.spans:
                    spans.append(ReceivedSpan(service, s.name, s.kind, s.trace_id.hex(), s.span_id.hex(),
                                              s.parent_span_id.hex(), {a.key: _value(a.value) for a in s.attributes},
                                              s.status.code))
        with self._lock:
            self._spans += spans
        return trace_service_pb2.ExportTraceServiceResponse()

    def spans(self) -> list[ReceivedSpan]:
        with self._lock:
            return list(self._spans)

    def wait_for(self, predicate, timeout_s: float = 20.0) -> list[ReceivedSpan]:
        """Poll until predicate(spans) holds; return the spans (the caller's asserts say what was missing)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            spans = self.spans()
            if predicate(spans):
                return spans
            time.sleep(0.1)
        return self.spans()

    def stop(self) -> None:
        self.server.stop(0)
