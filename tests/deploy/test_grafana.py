"""deploy/grafana/: the specd dashboard has the panels people graph, every PromQL expression in it names only series
that common.telemetry.metrics exposes (with the suffix its type has) and jobs Prometheus scrapes, and the provisioned
datasource and dashboard folder are the ones the panels and the compose mounts use."""
import json
import re
from dataclasses import dataclass, field

import pytest
import yaml
from prometheus_client.metrics import MetricWrapperBase

from common.telemetry import metrics
from tests.deploy.manifests import DEPLOY, load_compose

GRAFANA = DEPLOY / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "specd.json"
DATASOURCES = GRAFANA / "provisioning" / "datasources" / "prometheus.yml"
DASHBOARD_PROVIDERS = GRAFANA / "provisioning" / "dashboards" / "specd.yml"
PROMETHEUS = DEPLOY / "prometheus" / "prometheus.yml"

# title → series its expressions must read
REQUIRED_PANELS = {
    "Acceptance rate": {"specd_spec_decode_num_accepted_tokens_total", "specd_spec_decode_num_draft_tokens_total"},
    "Mean acceptance length": {"specd_spec_decode_num_accepted_tokens_total", "specd_spec_decode_num_drafts_total"},
    "Acceptance per draft position": {"specd_spec_decode_num_accepted_tokens_per_pos_total",
                                      "specd_drafted_per_position_total"},
    "Time to first token": {"specd_time_to_first_token_seconds_bucket"},
    "Inter-token latency": {"specd_inter_token_latency_seconds_bucket"},
    "End-to-end request latency": {"specd_e2e_request_latency_seconds_bucket"},
    "Output tokens / s": {"specd_tokens_generated_total"},
    "Requests running / waiting": {"specd_num_requests_running", "specd_num_requests_waiting"},
    "KV cache usage": {"specd_kv_cache_usage_perc"},
    "Verifier batch size": {"specd_verifier_batch_size_sum", "specd_verifier_batch_size_count"},
}
LATENCY_PANELS = ("Time to first token", "Inter-token latency", "End-to-end request latency")

_SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}
_TARGET_LABELS = {"job", "instance"}          # what Prometheus adds to every scraped series
_PROMQL_WORDS = {"sum", "avg", "min", "max", "count", "rate", "irate", "increase", "histogram_quantile",
                 "clamp_min", "clamp_max", "by", "without", "on", "ignoring", "group_left", "group_right", "and",
                 "or", "unless", "bool", "offset", "abs", "vector", "scalar"}
_MATCHERS = re.compile(r"\{([^}]*)\}")
_MATCHER = re.compile(r'([A-Za-z_]\w*)\s*(=~|!~|!=|=)\s*"((?:[^"\\]|\\.)*)"')
_RANGE = re.compile(r"\[[^\]]*\]")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")
_IDENT = re.compile(r"[A-Za-z_:][A-Za-z0-9_:]*")


def exposed_series() -> dict[str, tuple[str, ...]]:
    """Series name as scraped (`specd_x_total`, `specd_y_bucket`, `specd_z`) → the metric's label names."""
    out = {}
    for metric in {id(v): v for v in vars(metrics).values() if isinstance(v, MetricWrapperBase)}.values():
        for family in metric.describe():
            for suffix in _SUFFIXES[family.type]:
                out[family.name + suffix] = tuple(metric._labelnames)
    return out


@dataclass
class Query:
    series: set[str] = field(default_factory=set)
    words: set[str] = field(default_factory=set)                      # functions, aggregators, keywords
    matchers: list[tuple[str, str, str]] = field(default_factory=list)  # (label, op, value)
    grouping: set[str] = field(default_factory=set)                     # labels of by (...), on (...), ...
    quantiles: set[float] = field(default_factory=set)


def parse(expr: str) -> Query:
    """The names a PromQL expression uses: enough of the grammar for dashboards (selectors, ranges, grouping)."""
    q = Query(matchers=[m for block in _MATCHERS.findall(expr) for m in _MATCHER.findall(block)])
    q.quantiles = {float(x) for x in re.findall(r"histogram_quantile\(\s*([0-9.]+)", expr)}
    rest = _MATCHERS.sub(" ", _RANGE.sub(" ", expr))
    q.grouping = {label.strip() for labels in _GROUPING.findall(rest) for label in labels.split(",") if label.strip()}
    for name in _IDENT.findall(_GROUPING.sub(lambda m: m.group(0).split("(")[0], rest)):
        (q.series if name.startswith("specd_") else q.words).add(name)
    return q


def problems(expr: str, series: dict[str, tuple[str, ...]], jobs: set[str]) -> list[str]:
    q = parse(expr)
    out = [f"not a series common.telemetry.metrics exposes: {name}" for name in sorted(q.series - series.keys())]
    out += [f"not a PromQL word: {w}" for w in sorted(q.words - _PROMQL_WORDS)]
    if not q.series:
        out.append("reads no specd series")
    labels = _TARGET_LABELS | {label for name in q.series & series.keys() for label in series[name]}
    if any(name.endswith("_bucket") for name in q.series):
        labels.add("le")
        if "le" not in q.grouping or "histogram_quantile" not in q.words:
            out.append("a _bucket series outside histogram_quantile(..., sum by (le) (...))")
    out += [f"unknown label {label}" for label in sorted(q.grouping - labels)]
    for label, op, value in q.matchers:
        if label not in labels:
            out.append(f"unknown label {label}")
        if label == "job":
            named = set(value.split("|")) if op in ("=~", "!~") else {value}
            out += [f"job {job!r} is not scraped" for job in sorted(named - jobs)]
    return out


@pytest.fixture(scope="module")
def dashboard():
    return json.loads(DASHBOARD.read_text())


@pytest.fixture(scope="module")
def prometheus():
    return yaml.safe_load(PROMETHEUS.read_text())


@pytest.fixture(scope="module")
def jobs(prometheus):
    return {job["job_name"] for job in prometheus["scrape_configs"]}


@pytest.fixture(scope="module")
def datasource():
    [source] = yaml.safe_load(DATASOURCES.read_text())["datasources"]
    return source


def targets(dashboard):
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            yield panel, target


def test_the_dashboard_has_the_panels_people_graph(dashboard):
    panels = {p["title"]: p for p in dashboard["panels"]}
    assert len(panels) == len(dashboard["panels"]), "two panels share a title"
    for title, needed in REQUIRED_PANELS.items():
        assert title in panels, f"missing panel {title!r}"
        read = {name for t in panels[title]["targets"] for name in parse(t["expr"]).series}
        assert needed <= read, f"{title}: reads {sorted(read)}, needs {sorted(needed)}"
    for title in LATENCY_PANELS:
        quantiles = {x for t in panels[title]["targets"] for x in parse(t["expr"]).quantiles}
        assert quantiles == {0.5, 0.95, 0.99}, title
    assert any("position" in parse(t["expr"]).grouping for t in panels["Acceptance per draft position"]["targets"])
    assert dashboard["uid"] and dashboard["title"]
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for p in dashboard["panels"]:
        assert p["gridPos"]["x"] + p["gridPos"]["w"] <= 24, p["title"]


def test_every_expression_reads_only_series_the_services_expose(dashboard, jobs):
    series = exposed_series()
    found = {f"{panel['title']} / {t['refId']}: {problem}"
             for panel, t in targets(dashboard) for problem in problems(t["expr"], series, jobs)}
    assert not found, "\n".join(sorted(found))


@pytest.mark.parametrize("expr, problem", [
    ("sum(rate(specd_spec_decode_num_drafts[1m]))", "not a series"),                # a counter without _total
    ("specd_kv_cache_usage_perc_total", "not a series"),                            # a gauge with _total
    ("sum(rate(specd_time_to_first_token_seconds[1m]))", "not a series"),           # a histogram's bare name
    ("sum(rate(specd_time_to_first_token_seconds_bucket[1m]))", "outside histogram_quantile"),
    ("sum by (position) (rate(specd_tokens_generated_total[1m]))", "unknown label position"),
    ('specd_num_requests_running{job="gatway"}', "is not scraped"),
    ("rat(specd_tokens_generated_total[1m])", "not a PromQL word"),
])
def test_the_expression_check_catches_wrong_names(expr, problem, jobs):
    assert any(problem in p for p in problems(expr, exposed_series(), jobs)), problems(expr, exposed_series(), jobs)


def test_panels_use_the_provisioned_prometheus_datasource(dashboard, datasource, prometheus):
    assert datasource["type"] == "prometheus" and datasource["isDefault"]
    for panel, target in targets(dashboard):
        for ds in (panel["datasource"], target["datasource"]):
            assert ds == {"type": "prometheus", "uid": datasource["uid"]}, panel["title"]
    # $__rate_interval is derived from the datasource's scrape interval: it must be Prometheus's
    assert datasource["jsonData"]["timeInterval"] == prometheus["global"]["scrape_interval"]


def test_datasource_url_is_the_compose_prometheus_service(datasource):
    services = load_compose()["services"]
    scheme, _, address = datasource["url"].partition("://")
    host, _, port = address.partition(":")
    assert scheme == "http" and host in services
    assert any(p.rsplit(":", 1)[1] == port for p in services[host]["ports"])


def test_grafana_loads_the_dashboard_folder_it_is_given():
    grafana = load_compose()["services"]["grafana"]
    mounts = {}
    for volume in grafana["volumes"]:
        source, target, mode = volume.split(":")
        assert mode == "ro", volume
        mounts[target] = (DEPLOY / source).resolve()
    assert mounts["/etc/grafana/provisioning"] == (GRAFANA / "provisioning").resolve()
    [provider] = yaml.safe_load(DASHBOARD_PROVIDERS.read_text())["providers"]
    assert provider["type"] == "file"
    assert mounts[provider["options"]["path"]] == DASHBOARD.parent.resolve()
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    folder, _, name = home.rpartition("/")
    assert (mounts[folder] / name).resolve() == DASHBOARD.resolve()
