"""Every Prometheus metric of the three services, defined once, and the `/metrics` HTTP endpoint.

Each process exposes the whole set; a service only moves the ones it owns (the gateway: requests, tokens,
acceptance, K, latencies, fallbacks; the verifier and the draft service: batch sizes, queue depth, KV blocks,
prefix cache). Rates are left to PromQL (tokens/s = rate(specd_tokens_generated_total[1m])).
"""
from __future__ import annotations

import logging
from collections.abc import Callable

from prometheus_client import Counter, Gauge, Histogram, start_http_server

log = logging.getLogger(__name__)

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_K_BUCKETS = (0, 1, 2, 3, 4, 5, 6, 7, 8, 12, 16, 32)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)

# ---- gateway: requests and speculation ---------------------------------------------------------------------
REQUESTS = Counter("specd_requests", "Generate/GenerateStream requests finished, by gRPC status", ["status"])
AUTH_REFUSED = Counter("specd_auth_refused", "Gateway calls refused before running; reason: unauthenticated "
                       "(missing or invalid API key) | rate_limited (the key's bucket was empty)", ["reason"])
TOKENS_GENERATED = Counter("specd_tokens_generated", "Output tokens returned to clients")
DRAFTED_TOKENS = Counter("specd_drafted_tokens", "Draft tokens sent to the verifier")
ACCEPTED_TOKENS = Counter("specd_accepted_tokens", "Draft tokens the verifier accepted")
ACCEPTANCE_RATE = Gauge("specd_acceptance_rate", "Accepted / drafted tokens since start "
                        "(windowed: rate(specd_accepted_tokens_total) / rate(specd_drafted_tokens_total))")
DRAFTED_PER_POSITION = Counter("specd_drafted_per_position", "Draft tokens sent at draft position i (1-based)",
                               ["position"])
ACCEPTED_PER_POSITION = Counter("specd_accepted_per_position", "Draft tokens accepted at draft position i "
                                "(1-based)", ["position"])
ACCEPTANCE_LENGTH = Histogram("specd_acceptance_length", "Tokens emitted per verify round (accepted + 1); its "
                              "mean is the mean acceptance length", buckets=tuple(range(1, 10)) + (12, 16, 33))
K_CHOSEN = Histogram("specd_k_chosen", "Draft tokens asked for per round (0 = plain decoding)", buckets=_K_BUCKETS)
FALLBACK_ROUNDS = Counter("specd_fallback_rounds", "Rounds decoded without drafts because the draft service "
                          "failed, missed its deadline or is marked down after a failure")
DRAFT_LATENCY = Histogram("specd_draft_latency_seconds", "Propose round trip seen by the gateway",
                          buckets=_LATENCY_BUCKETS)
VERIFY_LATENCY = Histogram("specd_verify_latency_seconds", "Verify round trip seen by the gateway",
                           buckets=_LATENCY_BUCKETS)
ROUND_LATENCY = Histogram("specd_round_latency_seconds", "One draft→verify round seen by the gateway",
                          buckets=_LATENCY_BUCKETS)
REQUESTS_IN_FLIGHT = Gauge("specd_requests_in_flight", "Generate/GenerateStream requests the gateway is serving now")

# ---- verifier and draft service: batching, queues, KV -------------------------------------------------------
VERIFIER_BATCH_SIZE = Histogram("specd_verifier_batch_size", "Verify calls sharing one target forward pass",
                                buckets=_BATCH_BUCKETS)
DRAFT_BATCH_SIZE = Histogram("specd_draft_batch_size", "Propose calls drafted together", buckets=_BATCH_BUCKETS)
VERIFIER_QUEUE_DEPTH = Gauge("specd_verifier_queue_depth", "Verify calls waiting for the engine thread")
DRAFT_QUEUE_DEPTH = Gauge("specd_draft_queue_depth", "Propose calls waiting for the drafter thread")
KV_BLOCKS_USED = Gauge("specd_kv_blocks_used", "Paged KV blocks held by sequences (this service's model)")
KV_BLOCKS_FREE = Gauge("specd_kv_blocks_free", "Paged KV blocks free (this service's model)")
VERIFIER_SESSIONS = Gauge("specd_verifier_sessions", "Verifier sessions open (each holds its request's KV blocks)")
VERIFIER_WAITING = Gauge("specd_verifier_waiting_sessions", "New or re-prefilled sessions waiting for free KV blocks")
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
        DRAFTED_TOKENS.inc(drafted)
        ACCEPTED_TOKENS.inc(accepted)
        _AcceptanceTotals.drafted += drafted
        _AcceptanceTotals.accepted += accepted
        for i in range(drafted):
            position = str(i + 1)
            DRAFTED_PER_POSITION.labels(position).inc()
            if i < accepted:
                ACCEPTED_PER_POSITION.labels(position).inc()


def watch_engine(queue_depth: Gauge, engine_queue_depth: Callable[[], int], allocator=None) -> None:
    """Read a queue depth and the KV allocator's counts when scraped (nothing runs on the request path)."""
    queue_depth.set_function(engine_queue_depth)
    if allocator is not None:
        KV_BLOCKS_USED.set_function(lambda: allocator.num_used)
        KV_BLOCKS_FREE.set_function(lambda: allocator.num_free)


def start_metrics_server(port: int, host: str = "0.0.0.0") -> int | None:
    """Serve /metrics on `port` (0 = off) from a daemon thread; returns the bound port or None."""
    if not port:
        return None
    server, _ = start_http_server(port, addr=host)
    bound = server.server_address[1]
    log.info("Prometheus metrics on http://%s:%d/metrics", host, bound)
    return bound
