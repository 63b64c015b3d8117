"""Metric helpers move the right series by the right amounts, and /metrics serves them over HTTP."""
import urllib.request

from prometheus_client import REGISTRY

from common.distributed import free_port
from common.telemetry import metrics


def value(name, **labels) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def test_record_round_counts_tokens_positions_and_lengths():
    names = [("specd_drafted_tokens_total", {}), ("specd_accepted_tokens_total", {}),
             ("specd_tokens_generated_total", {}), ("specd_k_chosen_count", {}), ("specd_k_chosen_sum", {}),
             ("specd_acceptance_length_sum", {}), ("specd_fallback_rounds_total", {}),
             ("specd_accepted_per_position_total", {"position": "1"}),
             ("specd_accepted_per_position_total", {"position": "3"}),
             ("specd_drafted_per_position_total", {"position": "4"})]
    before = [value(n, **lb) for n, lb in names]
    metrics.record_round(k_chosen=4, drafted=4, accepted=2, emitted=3, seconds=0.01, fallback=False)
    metrics.record_round(k_chosen=3, drafted=0, accepted=0, emitted=1, seconds=0.02, fallback=True)
    delta = [value(n, **lb) - b for (n, lb), b in zip(names, before)]
    assert delta == [4, 2, 4, 2, 7, (2 + 1) + (0 + 1), 1, 1, 0, 1]
    assert 0 < value("specd_acceptance_rate") <= 1


def test_metrics_server_off_by_default_and_scrapable_when_on():
    assert metrics.start_metrics_server(0) is None
    metrics.PREFIX_CACHE_LOOKUPS.labels("redis", "hit").inc()
    metrics.PREFIX_CACHE_BYTES.labels("redis", "load").inc(4096)

    class Allocator:
        num_used, num_free = 3, 61

    metrics.watch_engine(metrics.VERIFIER_QUEUE_DEPTH, lambda: 5, Allocator())
    port = metrics.start_metrics_server(free_port(), "127.0.0.1")
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    assert 'specd_prefix_cache_lookups_total{result="hit",tier="redis"}' in body
    assert 'specd_prefix_cache_bytes_total{direction="load",tier="redis"}' in body
    assert "specd_verifier_queue_depth 5.0" in body
    assert "specd_kv_blocks_used 3.0" in body and "specd_kv_blocks_free 61.0" in body


def test_the_cost_model_gauges_read_the_model_when_scraped():
    from prometheus_client import REGISTRY

    from common.speculative.adaptive_k import CostModel
    from common.telemetry import metrics
    costs = CostModel()
    metrics.watch_costs(costs)
    costs.draft_call, costs.t_verify_base = 0.012, 0.25           # later observations, no call in between
    value = lambda part: REGISTRY.get_sample_value("specd_cost_model_seconds", {"part": part})   # noqa: E731
    assert value("draft_call") == 0.012 and value("verify_base") == 0.25 and value("draft_step") == 0.0
