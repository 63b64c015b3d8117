"""The vLLM-shaped serving metrics: spec-decode counters fed by record_round, request latency histograms, running /
waiting / KV usage gauges read when scraped, and the older names serving the same series."""
import pytest
from prometheus_client import REGISTRY

from common.telemetry import metrics


def value(name, **labels) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def bucket(name, le: float) -> float:
    return value(f"{name}_bucket", le=str(le))


def test_record_round_counts_drafts_tokens_and_acceptance_per_position():
    names = [("specd_spec_decode_num_drafts_total", {}), ("specd_spec_decode_num_draft_tokens_total", {}),
             ("specd_spec_decode_num_accepted_tokens_total", {})] + [
        ("specd_spec_decode_num_accepted_tokens_per_pos_total", {"position": str(p)}) for p in (1, 2, 3, 4)]
    before = [value(n, **lb) for n, lb in names]
    metrics.record_round(k_chosen=4, drafted=4, accepted=2, emitted=3, seconds=0.01, fallback=False)
    metrics.record_round(k_chosen=3, drafted=3, accepted=3, emitted=4, seconds=0.01, fallback=False)
    metrics.record_round(k_chosen=2, drafted=0, accepted=0, emitted=1, seconds=0.01, fallback=True)  # no draft
    metrics.record_round(k_chosen=0, drafted=0, accepted=0, emitted=1, seconds=0.01, fallback=False)
    delta = [value(n, **lb) - b for (n, lb), b in zip(names, before)]
    #        drafts  draft tokens  accepted  per position 1..4
    assert delta == [2, 4 + 3, 2 + 3, 2, 2, 1, 0]
    mean_acceptance_length = 1 + delta[2] / delta[0]
    assert mean_acceptance_length == 3.5


def test_spec_decode_counters_are_counters_and_keep_their_older_names():
    metrics.record_round(k_chosen=2, drafted=2, accepted=1, emitted=2, seconds=0.01, fallback=False)
    types = {f.name: f.type for f in REGISTRY.collect()}
    for name in ("specd_spec_decode_num_drafts", "specd_spec_decode_num_draft_tokens",
                 "specd_spec_decode_num_accepted_tokens", "specd_spec_decode_num_accepted_tokens_per_pos",
                 "specd_drafted_tokens", "specd_accepted_tokens", "specd_accepted_per_position"):
        assert types[name] == "counter", name
    assert value("specd_drafted_tokens_total") == value("specd_spec_decode_num_draft_tokens_total") > 0
    assert value("specd_accepted_tokens_total") == value("specd_spec_decode_num_accepted_tokens_total") > 0
    assert (value("specd_accepted_per_position_total", position="1")
            == value("specd_spec_decode_num_accepted_tokens_per_pos_total", position="1") > 0)


def test_observe_request_latency_lands_ttft_and_e2e_in_their_histograms():
    ttft, e2e, itl = ("specd_time_to_first_token_seconds", "specd_e2e_request_latency_seconds",
                      "specd_inter_token_latency_seconds")
    before = {n: (value(f"{n}_count"), value(f"{n}_sum")) for n in (ttft, e2e, itl)}
    ttft_low, ttft_high = bucket(ttft, 0.25), bucket(ttft, 0.5)
    e2e_low, e2e_high = bucket(e2e, 60.0), bucket(e2e, 90.0)
    metrics.observe_request_latency(0.3, 75.0)
    metrics.observe_request_latency(None, 2.0)          # no token produced: no TTFT observation
    assert value(f"{ttft}_count") - before[ttft][0] == 1
    assert value(f"{ttft}_sum") - before[ttft][1] == pytest.approx(0.3)
    assert (bucket(ttft, 0.25) - ttft_low, bucket(ttft, 0.5) - ttft_high) == (0, 1)
    assert value(f"{e2e}_count") - before[e2e][0] == 2
    assert value(f"{e2e}_sum") - before[e2e][1] == pytest.approx(77.0)
    assert (bucket(e2e, 60.0) - e2e_low, bucket(e2e, 90.0) - e2e_high) == (1, 2)     # 2 s and 75 s
    assert value(f"{itl}_count") == before[itl][0]      # ITL moves only through observe_inter_token


def test_observe_inter_token_lands_in_the_itl_histogram_only():
    itl, ttft = "specd_inter_token_latency_seconds", "specd_time_to_first_token_seconds"
    count, total, ttft_count = value(f"{itl}_count"), value(f"{itl}_sum"), value(f"{ttft}_count")
    low, high = bucket(itl, 0.05), bucket(itl, 0.075)
    metrics.observe_inter_token(0.06)
    metrics.observe_inter_token(0.06)
    assert value(f"{itl}_count") - count == 2 and value(f"{itl}_sum") - total == pytest.approx(0.12)
    assert (bucket(itl, 0.05) - low, bucket(itl, 0.075) - high) == (0, 2)
    assert value(f"{ttft}_count") == ttft_count


def test_kv_usage_is_read_from_the_allocator_when_scraped():
    class Allocator:
        num_used, num_free = 16, 48

    allocator = Allocator()
    metrics.watch_engine(metrics.VERIFIER_QUEUE_DEPTH, lambda: 0, allocator)
    assert value("specd_kv_cache_usage_perc") == 0.25
    allocator.num_used, allocator.num_free = 64, 0
    assert value("specd_kv_cache_usage_perc") == 1.0
    allocator.num_used, allocator.num_free = 0, 0       # an allocator with nothing in it reads empty, not NaN
    assert value("specd_kv_cache_usage_perc") == 0.0


def test_running_and_waiting_are_one_gauge_each_under_both_names():
    running = value("specd_num_requests_running")
    metrics.REQUESTS_IN_FLIGHT.inc()
    try:
        assert value("specd_num_requests_running") == value("specd_requests_in_flight") == running + 1
    finally:
        metrics.REQUESTS_IN_FLIGHT.dec()
    metrics.VERIFIER_WAITING.set_function(lambda: 3)
    try:
        assert value("specd_num_requests_waiting") == value("specd_verifier_waiting_sessions") == 3
    finally:
        metrics.VERIFIER_WAITING.set_function(lambda: 0)
