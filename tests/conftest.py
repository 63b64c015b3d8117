"""Shared fixtures: tiny random checkpoints (built once per session) and the real models' folders."""
from __future__ import annotations

import pytest

from tests.checkpoints import build_checkpoint
from tests.memory_watch import MemoryWatch, release_memory

_memory = MemoryWatch()


def pytest_sessionstart(session):
    _memory.start()


def pytest_runtest_logstart(nodeid, location):
    _memory.current_test = nodeid


@pytest.fixture(scope="module", autouse=True)
def _return_memory_after_each_module():
    """A module's models are freed when its fixtures end; hand the pages back to the OS too, so the next module's
    processes (a three-service topology of the real pair) never sit beside this one's leftovers."""
    yield
    release_memory()


def pytest_terminal_summary(terminalreporter):
    _memory.stop()
    terminalreporter.write_line(f"peak memory of the test run (pytest + its processes, RSS summed): "
                                f"{_memory.peak_bytes / 2**30:.2f} GiB (pytest itself "
                                f"{_memory.peak_own_bytes / 2**30:.2f} GiB), during {_memory.peak_test or '-'}")


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    return {arch: build_checkpoint(root / arch, arch, seed=i) for i, arch in enumerate(("qwen2", "qwen3", "llama"))}


@pytest.fixture(scope="session")
def real_models():
    """Folders of the real models; fetched by `make models` (the `make test` target runs it first)."""
    from common.models.fetch import DRAFT_MODEL, LLAMA_MODEL, TARGET_MODEL, is_fetched, model_path
    keys = {"draft": DRAFT_MODEL, "target": TARGET_MODEL, "llama": LLAMA_MODEL}
    missing = [k for k in keys.values() if not is_fetched(k)]
    if missing:
        pytest.fail(f"real models not fetched: {missing}; run `make models` first")
    return {role: model_path(key) for role, key in keys.items()}


@pytest.fixture()
def redis_server():
    """A fresh real redis-server on a free loopback port, killed afterwards."""
    from scripts.dev.redis_server import RedisServer
    server = RedisServer()
    yield server
    server.stop()


@pytest.fixture()
def exporter():
    """Spans kept in memory (tests/common/telemetry, tests/gateway/test_auth.py)."""
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
    return InMemorySpanExporter()


@pytest.fixture()
def provider(exporter):
    """An in-memory tracer provider, never installed globally (other tests keep the no-op API)."""
    from common.telemetry.tracing import build_tracer_provider
    p = build_tracer_provider("specd-test", exporter=exporter)
    yield p
    p.shutdown()
