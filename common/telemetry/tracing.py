"""OpenTelemetry set-up: OTLP/gRPC export with a batch processor when `OTEL_EXPORTER_OTLP_ENDPOINT` is set.

Without an endpoint nothing is installed: the API's no-op tracer answers every span in a few microseconds,
and the interceptors are not added at all. With one, spans are queued in memory (bounded: a
full queue drops spans, it never waits) and a background thread exports them; a dead or slow collector only
costs that thread its retries, never a request its time.
"""
from __future__ import annotations

import logging
import os
import threading
from contextlib import contextmanager

from opentelemetry import context as otel_context
from opentelemetry import trace

log = logging.getLogger(__name__)

GATEWAY, DRAFT, VERIFIER, CLIENT = "specd-gateway", "specd-draft", "specd-verifier", "specd-client"

_EXPORT_TIMEOUT_S = 5.0      # one export, retries included; the exporter's own default is 10 s
_MAX_QUEUE_SPANS = 4096      # ~ 10 s of spans at 100 rounds/s; beyond it new spans are dropped


def otlp_endpoint() -> str | None:
    """The collector's address from the standard variables, or None (tracing off)."""
    if os.environ.get("OTEL_SDK_DISABLED", "").lower() == "true":
        return None
    endpoint = (os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
                or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or "").strip()
    if not endpoint:
        return None
    # A bare host:port would be taken as a TLS endpoint by the exporter; Jaeger's 4317 speaks plaintext.
    return endpoint if "://" in endpoint else f"http://{endpoint}"


def setup_tracing(service_name: str, endpoint: str | None = None):
    """Install this process's TracerProvider, named `service_name` (e.g. "specd-verifier"), exporting to the
    OTLP/gRPC collector at `endpoint` (default: the OTEL_EXPORTER_OTLP_* variables).

    Returns the provider, or None when tracing is off (no endpoint): then nothing is installed."""
    provider = build_tracer_provider(service_name, endpoint=endpoint)
    if provider is not None:
        trace.set_tracer_provider(provider)
    return provider


def build_tracer_provider(service_name: str, endpoint: str | None = None, exporter=None):
    """A TracerProvider for `service_name`, not installed: OTLP export through a bounded batch processor, or
    `exporter` (e.g. an InMemorySpanExporter in tests) processed synchronously. None without either."""
    endpoint = endpoint or otlp_endpoint()
    if exporter is None and endpoint is None:
        return None
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor

    provider = TracerProvider(resource=Resource.create({SERVICE_NAME: service_name}), shutdown_on_exit=False)
    if exporter is not None:
        provider.add_span_processor(SimpleSpanProcessor(exporter))
        return provider
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    timeout = None if os.environ.get("OTEL_EXPORTER_OTLP_TIMEOUT") else _EXPORT_TIMEOUT_S
    queue = None if os.environ.get("OTEL_BSP_MAX_QUEUE_SIZE") else _MAX_QUEUE_SPANS
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint, timeout=timeout),
                                                   max_queue_size=queue))
    # While the collector is down, one error line per failed batch says so. The exporter's per-retry warnings
    # and the processor's "Queue full, dropping Span" (one log record per span once the queue is full: that
    # alone would make a dead collector slow every request) are silenced.
    logging.getLogger("opentelemetry.exporter.otlp.proto.grpc.exporter").setLevel(logging.ERROR)
    logging.getLogger("opentelemetry.sdk._shared_internal").setLevel(logging.ERROR)
    log.info("tracing: %s exports spans to %s", service_name, endpoint)
    return provider


def tracing_enabled() -> bool:
    """True once an SDK provider is installed in this process (by setup_tracing or by the application)."""
    return not isinstance(trace.get_tracer_provider(), (trace.ProxyTracerProvider, trace.NoOpTracerProvider))


def shutdown_tracing(provider, timeout_s: float = 2.0) -> None:
    """Flush what is queued and stop, waiting at most `timeout_s` (a dead collector cannot hold up exit)."""
    if provider is None:
        return
    worker = threading.Thread(target=provider.shutdown, name="otel-shutdown", daemon=True)
    worker.start()
    worker.join(timeout_s)
    if worker.is_alive():
        log.warning("tracing: spans still unexported after %.0fs at shutdown; dropped", timeout_s)


def current_context():
    """This thread's OpenTelemetry Context, to hand to another thread with a queued call."""
    return otel_context.get_current()


@contextmanager
def attached(ctx):
    """Make `ctx` (an OpenTelemetry Context captured on another thread, or None) current inside the block.

    The engine threads use it around per-call work, so spans opened there (prefix-cache lookups) join the
    trace of the RPC that queued the call."""
    if ctx is None:
        yield
        return
    token = otel_context.attach(ctx)
    try:
        yield
    finally:
        otel_context.detach(token)
