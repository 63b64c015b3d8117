"""deploy/prometheus/prometheus.yml: a config Prometheus accepts (checked by `promtool` where it is installed), with
one job per specd service; tests/deploy/test_compose.py checks its targets against the compose services."""
import re
import shutil
import subprocess

import pytest
import yaml

from tests.deploy.manifests import DEPLOY, SPECD_COMMANDS

PROMETHEUS = DEPLOY / "prometheus" / "prometheus.yml"
_DURATION = re.compile(r"^([0-9]+(ms|s|m|h|d|w|y))+$")


@pytest.fixture(scope="module")
def config():
    return yaml.safe_load(PROMETHEUS.read_text())


def test_the_config_has_only_known_sections_and_valid_durations(config):
    assert set(config) <= {"global", "scrape_configs", "rule_files", "alerting", "remote_write", "remote_read"}
    for key in ("scrape_interval", "evaluation_interval"):
        assert _DURATION.match(config["global"][key]), f"global.{key}={config['global'][key]!r}"


def test_one_static_job_per_specd_service(config):
    jobs = [job["job_name"] for job in config["scrape_configs"]]
    assert sorted(jobs) == sorted(SPECD_COMMANDS)
    for job in config["scrape_configs"]:
        assert set(job) == {"job_name", "static_configs"}, job["job_name"]      # /metrics over http: the defaults
        [static] = job["static_configs"]
        assert len(static["targets"]) == 1 and re.fullmatch(r"[a-z-]+:[0-9]+", static["targets"][0])


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool is not installed")
def test_promtool_accepts_the_config():
    proc = subprocess.run(["promtool", "check", "config", "--syntax-only", str(PROMETHEUS)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
