"""Every Prometheus metric of the three services, defined once, and the `/metrics` HTTP endpoint.

Each process exposes the whole set; a service only moves the ones it owns (the gateway: requests, tokens,
acceptance, K, latencies, fallbacks; the verifier and the draft service: batch sizes, queue depth, KV blocks,
prefix cache). Rates are left to PromQL (tokens/s = rate(specd_tokens_generated_total[1m])). The serving metrics
people graph are named and shaped like vLLM's (`vllm:x` is `specd_x` here; docs/metrics.md, deploy/grafana/).
"""
from __future__ import annotations

import logging
from collections.abc import Callable

from prometheus_client import REGISTRY, Counter, Gauge, Histogram, start_http_server
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

log = logging.getLogger(__name__)

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_K_BUCKETS = (0, 1, 2, 3, 4, 5, 6, 7, 8, 12, 16, 32)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
# Request latencies: fine below a second for GPU serving, and long enough for CPU serving too (a CPU prefill of a
# long prompt takes seconds, a CPU request of a few hundred tokens minutes).
_TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
_ITL_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 20.0)
_E2E_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 45.0, 60.0, 90.0, 120.0, 240.0, 480.0)


class _SecondName(Collector):
    """Serves one metric's samples under an older name too, so existing readers keep working while the quantity is
    counted once (read when scraped)."""

    def __init__(self, name: str, documentation: str, metric: Counter | Gauge):
        self.name, self.documentation, self.metric = name, documentation, metric
        REGISTRY.register(self)

    def collect(self):
        for family in self.metric.collect():
            out = Metric(self.name, self.documentation, family.type)
            for sample in family.samples:       # specd_x_total -> specd_old_total, specd_x_created -> ...
                out.add_sample(self.name + sample.name[len(family.name):], sample.labels, sample.value)
            yield out

# ---- gateway: requests and speculation ---------------------------------------------------------------------
REQUESTS = Counter("specd_requests", "Generate/GenerateStream requests finished, by gRPC status", ["status"])
AUTH_REFUSED = Counter("specd_auth_refused", "Gateway calls refused before running; reason: unauthenticated "
                       "(missing or invalid API key) | rate_limited (the key's bucket was empty)", ["reason"])
TOKENS_GENERATED = Counter("specd_tokens_generated", "Output tokens returned to clients")
ACCEPTANCE_RATE = Gauge("specd_acceptance_rate", "Accepted / drafted tokens since start "
                        "(windowed: rate(specd_accepted_tokens_total) / rate(specd_drafted_tokens_total))")
DRAFTED_PER_POSITION = Counter("specd_drafted_per_position", "Draft tokens sent at draft position i (1-based); "
                               "the denominator of per-position acceptance, since K varies by round", ["position"])
ACCEPTANCE_LENGTH = Histogram("specd_acceptance_length", "Tokens emitted per verify round (accepted + 1); its "
                              "mean is the mean acceptance length", buckets=tuple(range(1, 10)) + (12, 16, 33))
K_CHOSEN = Histogram("specd_k_chosen", "Draft tokens asked for per round (0 = plain decoding)", buckets=_K_BUCKETS)
FALLBACK_ROUNDS = Counter("specd_fallback_rounds", "Rounds decoded without drafts because the draft service "
                          "failed, missed its deadline or is marked down after a failure")
DRAFT_LATENCY = Histogram("specd_draft_latency_seconds", "Propose round trip seen by the gateway",
                          buckets=_LATENCY_BUCKETS)
VERIFY_LATENCY = Histogram("specd_verify_latency_seconds", "Verify round trip seen by the gateway",
                           buckets=_LATENCY_BUCKETS)
RPC_NETWORK = Histogram("specd_rpc_network_seconds", "A gateway call's time beyond what the service reports "
                        "computing and queueing: round trip + serialization, measured on every call", ["service"],
                        buckets=_LATENCY_BUCKETS)
COST_MODEL = Gauge("specd_cost_model_seconds", "The K controller's cost model: draft_call / verify_call (fixed cost "
                   "per call: round trip, serialization, queue), draft_step, draft_catchup (per token the draft "
                   "feeds to catch up after K = 0 rounds), verify_base (1-token pass), verify_per_token", ["part"])
PRE_DRAFTS = Counter("specd_pre_drafts", "Next-round proposals drafted while a round was verified, by outcome: "
                     "hit (used as the next round's proposal), miss (the verifier corrected a draft, or the bonus "
                     "token was not the guess), failed (the call failed; the round drafted afresh)", ["outcome"])
VERIFIER_ROUTED = Counter("specd_verifier_routed_sessions", "Sessions the gateway pinned to a verifier replica (new, "
                          "or moved there from a failed one), by replica address", ["replica"])
SESSION_MOVES = Counter("specd_verifier_session_moves", "Sessions moved to another verifier replica (re-prefilled "
                        "from the gateway's history) because theirs failed, by the failing call's status",
                        ["reason"])
VERIFIER_REPLICAS = Gauge("specd_verifier_replicas", "Verifier replicas the gateway knows, by state: healthy "
                          "(routable), unhealthy (failing calls, draining, or serving another tokenizer)", ["state"])
ROUND_LATENCY = Histogram("specd_round_latency_seconds", "One draft→verify round seen by the gateway",
                          buckets=_LATENCY_BUCKETS)

# ---- gateway: the vLLM-shaped serving metrics (vllm:<name> is specd_<name>) ---------------------------------------
TIME_TO_FIRST_TOKEN = Histogram("specd_time_to_first_token_seconds", "Request arrival to its first output token "
                                "delivered", buckets=_TTFT_BUCKETS)
INTER_TOKEN_LATENCY = Histogram("specd_inter_token_latency_seconds", "Time between two deliveries of output tokens "
                                "to one request (one observation per chunk after the first, as vLLM per step)",
                                buckets=_ITL_BUCKETS)
E2E_REQUEST_LATENCY = Histogram("specd_e2e_request_latency_seconds", "Request arrival to its last output token",
                                buckets=_E2E_BUCKETS)
NUM_REQUESTS_RUNNING = Gauge("specd_num_requests_running", "Generate/GenerateStream requests the gateway is serving "
                             "now")
SPEC_DECODE_NUM_DRAFTS = Counter("specd_spec_decode_num_drafts", "Verify rounds that carried at least one draft token")
SPEC_DECODE_NUM_DRAFT_TOKENS = Counter("specd_spec_decode_num_draft_tokens", "Draft tokens sent to the verifier")
SPEC_DECODE_NUM_ACCEPTED_TOKENS = Counter("specd_spec_decode_num_accepted_tokens", "Draft tokens the verifier "
                                          "accepted")
SPEC_DECODE_NUM_ACCEPTED_TOKENS_PER_POS = Counter(
    "specd_spec_decode_num_accepted_tokens_per_pos", "Draft tokens accepted at draft position i (1-based, unlike "
    "vLLM's 0-based label, to join specd_drafted_per_position)", ["position"])
REQUESTS_IN_FLIGHT = NUM_REQUESTS_RUNNING       # the name gateway/servicer.py moves

# ---- verifier and draft service: batching, queues, KV -------------------------------------------------------
VERIFIER_BATCH_SIZE = Histogram("specd_verifier_batch_size", "Verify calls sharing one target forward pass",
                                buckets=_BATCH_BUCKETS)
DRAFT_BATCH_SIZE = Histogram("specd_draft_batch_size", "Propose calls drafted together", buckets=_BATCH_BUCKETS)
VERIFIER_QUEUE_DEPTH = Gauge("specd_verifier_queue_depth", "Verify calls waiting for the engine thread")
DRAFT_QUEUE_DEPTH = Gauge("specd_draft_queue_depth", "Propose calls waiting for the drafter thread")
KV_BLOCKS_USED = Gauge("specd_kv_blocks_used", "Paged KV blocks held by sequences (this service's model)")
KV_BLOCKS_FREE = Gauge("specd_kv_blocks_free", "Paged KV blocks free (this service's model)")
VERIFIER_SESSIONS = Gauge("specd_verifier_sessions", "Verifier sessions open (each holds its request's KV blocks)")
NUM_REQUESTS_WAITING = Gauge("specd_num_requests_waiting", "Verifier sessions (new or re-prefilled) waiting for "
                             "free KV blocks")
VERIFIER_WAITING = NUM_REQUESTS_WAITING         # the name verifier_service/main.py sets
KV_CACHE_USAGE = Gauge("specd_kv_cache_usage_perc", "Fraction of paged KV blocks held by sequences, 0..1 (this "
                       "service's model)")
VERIFIER_PREEMPTIONS = Counter("specd_verifier_preemptions", "Running sessions preempted for lack of KV blocks (freed, "
                               "then re-prefilled by the gateway)")

# ---- prefix cache (verifier and draft) ------------------------------------------------------------------------
PREFIX_CACHE_LOOKUPS = Counter("specd_prefix_cache_lookups", "Prefix block lookups; tier: local|redis, "
                               "result: hit|miss|error", ["tier", "result"])
PREFIX_CACHE_BYTES = Counter("specd_prefix_cache_bytes", "Prefix block bytes moved; tier: local|redis, "
                             "direction: load|publish", ["tier", "direction"])
PREFIX_CACHE_BYPASS = Counter("specd_prefix_cache_bypass", "Cache operations skipped (Redis down, slow, full, "
                              "publish queue full, ...)", ["reason"])
PREFIX_CACHE_REJECTED = Counter("specd_prefix_cache_rejected", "Cached values refused on load (a miss) and deleted; "
                                "reason: bad_mac (not sealed with this replica's HMAC key: forged, tampered or "
                                "another key) | mismatch (header, length or token ids not those of the block)",
                                ["reason"])
PREFIX_CACHE_TOKENS = Counter("specd_prefix_cache_tokens", "Prefill tokens by origin; kind: cached|computed",
                              ["kind"])

# ---- names these metrics had before the vLLM-shaped ones: the same series, for dashboards and drills that read them
_SecondName("specd_drafted_tokens", "Draft tokens sent to the verifier (= specd_spec_decode_num_draft_tokens)",
            SPEC_DECODE_NUM_DRAFT_TOKENS)
_SecondName("specd_accepted_tokens", "Draft tokens the verifier accepted (= specd_spec_decode_num_accepted_tokens)",
            SPEC_DECODE_NUM_ACCEPTED_TOKENS)
_SecondName("specd_accepted_per_position", "Draft tokens accepted at draft position i, 1-based "
            "(= specd_spec_decode_num_accepted_tokens_per_pos)", SPEC_DECODE_NUM_ACCEPTED_TOKENS_PER_POS)
_SecondName("specd_requests_in_flight", "Generate/GenerateStream requests the gateway is serving now "
            "(= specd_num_requests_running)", NUM_REQUESTS_RUNNING)
_SecondName("specd_verifier_waiting_sessions", "New or re-prefilled sessions waiting for free KV blocks "
            "(= specd_num_requests_waiting)", NUM_REQUESTS_WAITING)


class _AcceptanceTotals:
    """Drafted/accepted since start, for the acceptance-rate gauge (read when scraped)."""
    drafted = 0
    accepted = 0

    @classmethod
    def rate(cls) -> float:
        return cls.accepted / cls.drafted if cls.drafted else 0.0


ACCEPTANCE_RATE.set_function(_AcceptanceTotals.rate)


def record_round(k_chosen: int, drafted: int, accepted: int, emitted: int, seconds: float, fallback: bool) -> None:
    """One gateway round: K asked for, drafts sent, drafts accepted, tokens it appended to the output."""
    K_CHOSEN.observe(k_chosen)
    ROUND_LATENCY.observe(seconds)
    TOKENS_GENERATED.inc(emitted)
    ACCEPTANCE_LENGTH.observe(accepted + 1)
    if fallback:
        FALLBACK_ROUNDS.inc()
    if drafted:
        SPEC_DECODE_NUM_DRAFTS.inc()
        SPEC_DECODE_NUM_DRAFT_TOKENS.inc(drafted)
        SPEC_DECODE_NUM_ACCEPTED_TOKENS.inc(accepted)
        _AcceptanceTotals.drafted += drafted
        _AcceptanceTotals.accepted += accepted
        for i in range(drafted):
            position = str(i + 1)
            DRAFTED_PER_POSITION.labels(position).inc()
            if i < accepted:
                SPEC_DECODE_NUM_ACCEPTED_TOKENS_PER_POS.labels(position).inc()


def watch_costs(costs) -> None:
    """The gateway's shared CostModel, read when scraped (nothing runs per round)."""
    for part, attr in (("draft_call", "draft_call"), ("draft_step", "t_draft"),
                       ("draft_catchup", "t_catchup"), ("verify_call", "verify_call"),
                       ("verify_base", "t_verify_base"), ("verify_per_token", "t_verify_per_token")):
        COST_MODEL.labels(part).set_function(lambda attr=attr: getattr(costs, attr))


def observe_request_latency(ttft_s: float | None, e2e_s: float) -> None:
    """Once per finished request (the gateway, when its last chunk or reply goes out): `ttft_s` seconds from the
    request's arrival to its first output token delivered, None when it produced no token (then only e2e is
    observed); `e2e_s` seconds from arrival to the end of the request."""
    if ttft_s is not None:
        TIME_TO_FIRST_TOKEN.observe(ttft_s)
    E2E_REQUEST_LATENCY.observe(e2e_s)


def observe_inter_token(seconds: float) -> None:
    """Once per chunk of output tokens delivered to a request after its first: `seconds` since the previous chunk
    of the same request (a round that emits several tokens is one observation, like vLLM's per-step ITL)."""
    INTER_TOKEN_LATENCY.observe(seconds)


def watch_engine(queue_depth: Gauge, engine_queue_depth: Callable[[], int], allocator=None) -> None:
    """Read a queue depth and the KV allocator's counts (`num_used`, `num_free`) when scraped (nothing runs on the
    request path)."""
    queue_depth.set_function(engine_queue_depth)
    if allocator is not None:
        KV_BLOCKS_USED.set_function(lambda: allocator.num_used)
        KV_BLOCKS_FREE.set_function(lambda: allocator.num_free)
        KV_CACHE_USAGE.set_function(lambda: allocator.num_used / ((allocator.num_used + allocator.num_free) or 1))


def start_metrics_server(port: int, host: str = "0.0.0.0") -> int | None:
    """Serve /metrics on `port` (0 = off) from a daemon thread; returns the bound port or None."""
    if not port:
        return None
    server, _ = start_http_server(port, addr=host)
    bound = server.server_address[1]
    log.info("Prometheus metrics on http://%s:%d/metrics", host, bound)
    return bound
