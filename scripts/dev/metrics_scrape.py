"""Read a service's Prometheus /metrics page (drills, the soak): every sample by name, labelled samples summed."""
from __future__ import annotations

import urllib.request

from prometheus_client.parser import text_string_to_metric_families


def scrape(port: int, host: str = "127.0.0.1") -> dict[str, float]:
    """Enough for gauges like KV blocks in use and for counters' totals; labels are summed away."""
    body = urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=10).read().decode()
    values: dict[str, float] = {}
    for family in text_string_to_metric_families(body):
        for s in family.samples:
            values[s.name] = values.get(s.name, 0.0) + s.value
    return values


def scrape_by_label(port: int, name: str, label: str, host: str = "127.0.0.1") -> dict[str, float]:
    """One metric's samples by the value of one of its labels (e.g. specd_pre_drafts_total by outcome)."""
    body = urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=10).read().decode()
    values: dict[str, float] = {}
    for family in text_string_to_metric_families(body):
        for s in family.samples:
            if s.name == name and label in s.labels:
                values[s.labels[label]] = values.get(s.labels[label], 0.0) + s.value
    return values
