"""An in-memory tracer provider, never installed globally (other tests keep the no-op API)."""
from __future__ import annotations

import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from common.telemetry.tracing import build_tracer_provider


@pytest.fixture()
def exporter():
    return InMemorySpanExporter()


@pytest.fixture()
def provider(exporter):
    p = build_tracer_provider("specd-test", exporter=exporter)
    yield p
    p.shutdown()
