"""Tracing and metrics of the real services: verifier, draft and gateway as processes on loopback, tiny checkpoints.

One request yields one trace across the client and the three services (received over OTLP/gRPC by a real
receiver), its counters move by exactly what the reply reports, and a dead collector does not slow serving.
"""
import json
import os
import statistics
import subprocess
import sys
import time
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from common.distributed import free_port
from common.rpc.health_check import check
from gateway.client import SpecdClient
from tests.checkpoints import build_model_folder, perturbed_copy
from tests.otlp_receiver import CLIENT, INTERNAL, SERVER, OtlpReceiver

PROMPT = [5, 9, 2, 77, 31]
MAX_TOKENS = 16


class Services:
    """verifier (TP=1), draft and gateway as `specd` processes, each with its own metrics port."""

    def __init__(self, target: str, draft: str, log_dir, otlp_endpoint: str | None):
        self.target, self.draft, self.log_dir = target, draft, log_dir
        self.ports = {name: free_port() for name in ("gateway", "draft", "verifier")}
        self.metrics_ports = {name: free_port() for name in self.ports}
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
        if otlp_endpoint:
            self.env.update(OTEL_EXPORTER_OTLP_ENDPOINT=otlp_endpoint, OTEL_BSP_SCHEDULE_DELAY="100")
        self.procs: dict[str, subprocess.Popen] = {}

    def _spawn(self, name: str, args: list[str]) -> None:
        log = open(self.log_dir / f"{name}.log", "w")
        self.procs[name] = subprocess.Popen(
            [sys.executable, "-m", "scripts.cli", name, *args, "--port", str(self.ports[name]),
             "--metrics-port", str(self.metrics_ports[name]), "--insecure"], env=self.env, stdout=log,
            stderr=subprocess.STDOUT)

    def start_backends(self) -> None:
        model = ["--dtype", "float32", "--kv-cache-gib", "0.05"]
        self._spawn("verifier", ["--model", self.target, "--tp", "1", *model])
        self._spawn("draft", ["--model", self.draft, *model])

    def start_gateway(self) -> None:
        self._wait("verifier")
        self._wait("draft")
        self._spawn("gateway", ["--tokenizer", self.target, "--k", "3", "--verifier", self.address("verifier"),
                                "--draft", self.address("draft"), "--http-port", "0"])
        self._wait("gateway")

    def address(self, name: str) -> str:
        return f"127.0.0.1:{self.ports[name]}"

    def _wait(self, name: str, timeout_s: float = 180) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.procs[name].poll() is not None:
                raise RuntimeError(f"{name} exited: {(self.log_dir / f'{name}.log').read_text()[-2000:]}")
            if check(self.address(name), timeout_s=1.0)[0]:
                return
            time.sleep(0.2)
        raise TimeoutError(f"{name} not SERVING after {timeout_s}s")

    def scrape(self, name: str) -> dict:
        body = urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_ports[name]}/metrics", timeout=10).read()
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for family in text_string_to_metric_families(body.decode()) for s in family.samples}

    def stop(self) -> None:
        for proc in self.procs.values():
            proc.terminate()
        for proc in self.procs.values():
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("telemetry")
    target = build_model_folder(root / "target", seed=21)
    return str(target), str(perturbed_copy(target, root / "draft", noise=0.05))


def start_all(*services: Services) -> None:
    for s in services:                                          # load the models side by side
        s.start_backends()
    for s in services:
        s.start_gateway()


@pytest.fixture(scope="module")
def receiver():
    r = OtlpReceiver()
    yield r
    r.stop()


@pytest.fixture(scope="module")
def traced(models, receiver, tmp_path_factory):
    s = Services(*models, tmp_path_factory.mktemp("traced-logs"), receiver.endpoint)
    start_all(s)
    yield s
    s.stop()


# ---- tracing ---------------------------------------------------------------------------------------------------
CLIENT_SCRIPT = """
import json, sys
from common.telemetry.tracing import CLIENT, setup_tracing, shutdown_tracing
from gateway.client import SpecdClient
provider = setup_tracing(CLIENT)
with SpecdClient(sys.argv[1]) as client:
    r = client.generate(json.loads(sys.argv[2]), max_tokens=int(sys.argv[3]), ignore_eos=True)
shutdown_tracing(provider, timeout_s=10)
print(json.dumps({"rounds": r.stats.rounds, "accepted": r.stats.accepted, "tokens": len(r.token_ids)}))
"""


def test_one_request_is_one_trace_across_client_gateway_draft_and_verifier(traced, receiver):
    out = subprocess.run([sys.executable, "-c", CLIENT_SCRIPT, traced.address("gateway"), json.dumps(PROMPT),
                          str(MAX_TOKENS)], env=traced.env, capture_output=True, text=True, timeout=120, check=True)
    reply = json.loads(out.stdout)
    rounds = reply["rounds"]

    def named(spans, service, name, kind):
        return [s for s in spans if s.service == service and s.name == name and s.kind == kind]

    def complete(spans):
        return (len(named(spans, "specd-verifier", "specd.v1.VerifierService/Verify", SERVER)) == rounds
                and len(named(spans, "specd-gateway", "round", INTERNAL)) == rounds
                and named(spans, "specd-client", "specd.v1.Gateway/Generate", CLIENT)
                # The gateway's server span ends after its reply is sent, so it may arrive after the client's.
                and named(spans, "specd-gateway", "specd.v1.Gateway/Generate", SERVER)
                and named(spans, "specd-verifier", "specd.v1.VerifierService/Release", SERVER)
                and len(named(spans, "specd-draft", "specd.v1.DraftService/Propose", SERVER))
                == len(named(spans, "specd-gateway", "specd.v1.DraftService/Propose", CLIENT)) > 0)

    # Info: start-up probes; Load: the gateway's replica-load poll every --verifier-refresh-s, each its own trace
    spans = [s for s in receiver.wait_for(complete) if not s.name.endswith(("/Info", "/Load"))]
    assert complete(spans), sorted((s.service, s.name) for s in spans)
    assert {s.service for s in spans} == {"specd-client", "specd-gateway", "specd-draft", "specd-verifier"}
    assert len({s.trace_id for s in spans}) == 1, sorted((s.trace_id[:6], s.service, s.name) for s in spans)
    assert not [s for s in spans if "health" in s.name or "reflection" in s.name]
    by_id = {s.span_id: s for s in spans}

    [root] = named(spans, "specd-client", "specd.v1.Gateway/Generate", CLIENT)
    [request] = named(spans, "specd-gateway", "specd.v1.Gateway/Generate", SERVER)
    assert root.parent_id == "" and request.parent_id == root.span_id
    assert request.attributes["specd.output_tokens"] == reply["tokens"]
    round_spans = named(spans, "specd-gateway", "round", INTERNAL)
    assert all(r.parent_id == request.span_id for r in round_spans)
    assert sorted(r.attributes["specd.round"] for r in round_spans) == list(range(rounds))
    assert sum(r.attributes["specd.accepted"] for r in round_spans) == reply["accepted"]
    assert not any(r.attributes["specd.fallback"] for r in round_spans)
    for service, name in (("specd-verifier", "specd.v1.VerifierService/Verify"),
                          ("specd-draft", "specd.v1.DraftService/Propose")):
        for server in named(spans, service, name, SERVER):
            client = by_id[server.parent_id]                 # each server span's parent: the gateway's client span
            assert (client.service, client.name, client.kind) == ("specd-gateway", name, CLIENT)
            assert by_id[client.parent_id].name == "round"
            assert server.attributes["specd.batch_size"] >= 1
            assert server.attributes["rpc.request.bytes"] > 0 and server.attributes["rpc.response.bytes"] > 0
    [release] = named(spans, "specd-verifier", "specd.v1.VerifierService/Release", SERVER)
    assert by_id[by_id[release.parent_id].parent_id] is request


# ---- metrics ---------------------------------------------------------------------------------------------------
def test_counters_move_by_what_the_reply_reports(traced):
    names = ("gateway", "draft", "verifier")
    before = {n: traced.scrape(n) for n in names}
    with SpecdClient(traced.address("gateway"), timeout_s=120) as client:
        reply = client.generate(PROMPT, max_tokens=MAX_TOKENS, ignore_eos=True)
    after = {n: traced.scrape(n) for n in names}

    def delta(service, name, **labels):
        key = (name, tuple(sorted(labels.items())))
        return after[service].get(key, 0.0) - before[service].get(key, 0.0)

    s = reply.stats
    assert delta("gateway", "specd_requests_total", status="OK") == 1
    assert delta("gateway", "specd_tokens_generated_total") == len(reply.token_ids) == MAX_TOKENS
    assert delta("gateway", "specd_drafted_tokens_total") == s.drafted > 0
    assert delta("gateway", "specd_accepted_tokens_total") == s.accepted
    assert delta("gateway", "specd_accepted_per_position_total", position="1") == s.accepted_per_position[0]
    assert delta("gateway", "specd_acceptance_length_sum") == s.accepted + s.rounds
    assert delta("gateway", "specd_acceptance_length_count") == s.rounds
    for histogram in ("specd_k_chosen", "specd_round_latency_seconds", "specd_verify_latency_seconds"):
        assert delta("gateway", f"{histogram}_count") == s.rounds
    proposals = delta("gateway", "specd_drafted_per_position_total", position="1")      # rounds that drafted
    # A round whose proposal was pre-drafted (a hit) drafted without a Propose of its own (gateway/pre_draft.py).
    hits = delta("gateway", "specd_pre_drafts_total", outcome="hit")
    pre_drafts = sum(delta("gateway", "specd_pre_drafts_total", outcome=o) for o in ("hit", "miss", "failed"))
    fresh = proposals - hits
    assert delta("gateway", "specd_draft_latency_seconds_count") == fresh > 0
    assert delta("gateway", "specd_fallback_rounds_total") == s.fallback_rounds == 0
    assert delta("verifier", "specd_verifier_batch_size_count") == s.rounds          # one request: one call a pass
    # One request: each draft call is a batch of its own; a pre-draft cancelled while queued never ran.
    assert fresh + hits <= delta("draft", "specd_draft_batch_size_count") <= fresh + pre_drafts
    for service in ("verifier", "draft"):
        kv = after[service]
        assert kv[("specd_kv_blocks_used", ())] + kv[("specd_kv_blocks_free", ())] > 0
    assert after["verifier"][("specd_verifier_queue_depth", ())] == 0
    assert 0 < after["gateway"][("specd_acceptance_rate", ())] <= 1


# ---- a dead collector ------------------------------------------------------------------------------------------
def test_a_dead_collector_does_not_slow_requests(models, traced, tmp_path_factory):
    """Same requests, interleaved (machine noise hits all alike): tracing off, tracing to the live receiver, and
    tracing to a closed port. The dead collector must cost nothing beyond tracing itself."""
    off = Services(*models, tmp_path_factory.mktemp("off-logs"), otlp_endpoint=None)
    dead = Services(*models, tmp_path_factory.mktemp("dead-logs"), otlp_endpoint=f"http://127.0.0.1:{free_port()}")
    try:
        start_all(off, dead)
        clients = {name: SpecdClient(s.address("gateway"), timeout_s=60)         # a hang fails at 60 s
                   for name, s in (("off", off), ("live", traced), ("dead", dead))}
        times: dict[str, list[float]] = {name: [] for name in clients}
        for i in range(9):
            for name, client in clients.items():
                t = time.perf_counter()
                reply = client.generate(PROMPT, max_tokens=24, ignore_eos=True)
                if i:                                        # the first request of each warms up
                    times[name].append(time.perf_counter() - t)
                assert len(reply.token_ids) == 24
        median = {name: statistics.median(ts) for name, ts in times.items()}
        print("median ms: " + ", ".join(f"{name} {m * 1000:.0f}" for name, m in median.items()))
        assert median["dead"] <= 1.3 * median["live"], times              # the collector's state does not matter
        assert median["dead"] <= 1.5 * median["off"], times               # nor does tracing, much
        assert check(dead.address("verifier"))[0] and check(dead.address("draft"))[0]
        for client in clients.values():
            client.close()
    finally:
        off.stop()
        dead.stop()
