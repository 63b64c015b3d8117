"""Tracing set-up: off without an endpoint, OTLP export over the wire, and a dead collector costs nothing."""
import threading
import time

import pytest
from opentelemetry import trace

from common.distributed import free_port
from common.telemetry.tracing import (attached, build_tracer_provider, current_context, otlp_endpoint,
                                      setup_tracing, shutdown_tracing, tracing_enabled)
from tests.otlp_receiver import OtlpReceiver


@pytest.fixture()
def no_otel_env(monkeypatch):
    for name in ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_SDK_DISABLED"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_endpoint_from_the_environment(no_otel_env):
    assert otlp_endpoint() is None
    no_otel_env.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "jaeger:4317")
    assert otlp_endpoint() == "http://jaeger:4317"                    # bare host:port is plaintext, like Jaeger
    no_otel_env.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "https://collector:4317")
    assert otlp_endpoint() == "https://collector:4317"
    no_otel_env.setenv("OTEL_SDK_DISABLED", "true")
    assert otlp_endpoint() is None


def test_no_endpoint_installs_nothing(no_otel_env):
    assert setup_tracing("specd-gateway") is None
    assert not tracing_enabled()
    assert not trace.get_tracer("x").start_span("s").is_recording()


def test_spans_reach_a_real_otlp_receiver_with_the_service_name():
    receiver = OtlpReceiver()
    provider = build_tracer_provider("specd-verifier", endpoint=receiver.endpoint)
    with provider.get_tracer("t").start_as_current_span("parent"):
        with provider.get_tracer("t").start_as_current_span("child", attributes={"specd.k": 4}):
            pass
    shutdown_tracing(provider, timeout_s=10)
    spans = {s.name: s for s in receiver.wait_for(lambda s: len(s) == 2, timeout_s=10)}
    receiver.stop()
    assert spans["child"].service == spans["parent"].service == "specd-verifier"
    assert spans["child"].parent_id == spans["parent"].span_id and spans["child"].attributes == {"specd.k": 4}


def test_a_dead_collector_neither_blocks_span_ends_nor_shutdown():
    provider = build_tracer_provider("specd-gateway", endpoint=f"http://127.0.0.1:{free_port()}")   # closed port
    tracer = provider.get_tracer("t")
    worst = 0.0
    t0 = time.perf_counter()
    for _ in range(6000):                             # more than the queue holds: the excess is dropped, not waited on
        t = time.perf_counter()
        tracer.start_span("s").end()
        worst = max(worst, time.perf_counter() - t)
    total = time.perf_counter() - t0
    # ~0.2 s in all and < 1 ms per span on an idle machine; a span end that waited on the exporter would take its
    # whole 5 s export timeout, so these bounds tell blocking from a busy machine's scheduling hiccups.
    assert total < 10.0 and worst < 2.0, (total, worst)
    t = time.perf_counter()
    shutdown_tracing(provider, timeout_s=1.0)
    assert time.perf_counter() - t < 2.0


def test_a_context_captured_on_one_thread_parents_spans_on_another(provider, exporter):
    tracer = provider.get_tracer("t")
    with tracer.start_as_current_span("rpc") as rpc:
        ctx = current_context()

    def engine_thread():
        with attached(ctx):
            tracer.start_span("prefix_cache.lookup").end()
        with attached(None):
            tracer.start_span("orphan").end()

    worker = threading.Thread(target=engine_thread)
    worker.start()
    worker.join()
    spans = {s.name: s for s in exporter.get_finished_spans()}
    assert spans["prefix_cache.lookup"].parent.span_id == rpc.get_span_context().span_id
    assert spans["orphan"].parent is None
