"""deploy/docker-compose.yml: valid against the compose specification, and consistent with the CLI it runs (flags,
ports, GPUs = --tp, health checks through `specd health`), with its .env.example, and with the image."""
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.deploy.manifests import (DEPLOY, GRPC_PORTS, SPECD_COMMANDS, compose_env, compose_variables,
                                    dockerfile_env, dockerfile_stages, env_file, host_port, image_tag, interpolate,
                                    load_compose, parse_specd)

CHECK_JSONSCHEMA = Path(sys.executable).parent / "check-jsonschema"
COMPOSE = DEPLOY / "docker-compose.yml"
COMPOSE_TLS = DEPLOY / "docker-compose.tls.yml"
PROMETHEUS = DEPLOY / "prometheus" / "prometheus.yml"


def _validate(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(CHECK_JSONSCHEMA), "--builtin-schema", "vendor.compose-spec", str(path)],
                          capture_output=True, text=True)


@pytest.fixture(scope="module")
def compose():
    return load_compose()


@pytest.fixture(scope="module")
def specd_services(compose):
    """Service name → (service, parsed `specd` arguments under the container's environment)."""
    image_env = dockerfile_env(dockerfile_stages()[1][-1])
    image = compose["services"]["verifier"]["image"]
    return {name: (svc, parse_specd(svc["command"], {**image_env, **compose_env(svc)}))
            for name, svc in compose["services"].items() if svc["image"] == image}


def test_validates_against_the_compose_spec_as_written_and_interpolated(tmp_path):
    proc = _validate(COMPOSE)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    interpolated = tmp_path / "docker-compose.yml"
    interpolated.write_text(yaml.safe_dump(load_compose()))
    proc = _validate(interpolated)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_the_validator_rejects_a_broken_file(tmp_path):
    broken = load_compose()
    broken["services"]["gateway"]["helthcheck"] = broken["services"]["gateway"].pop("healthcheck")
    path = tmp_path / "docker-compose.yml"
    path.write_text(yaml.safe_dump(broken))
    assert _validate(path).returncode != 0


def test_env_example_documents_every_variable_with_the_compose_default():
    used = compose_variables(COMPOSE.read_text())
    documented = env_file()
    assert set(used) == set(documented), (f"undocumented: {set(used) - set(documented)}; "
                                          f"unused: {set(documented) - set(used)}")
    for name, default in used.items():
        assert default == documented[name], f"${{{name}}}: compose default {default!r} != .env.example"


def test_images_are_pinned(compose):
    for name, svc in compose["services"].items():
        tag = image_tag(svc["image"])
        assert tag and tag != "latest", f"{name}: image {svc['image']} is not pinned"


def test_every_service_has_a_memory_limit(compose):
    for name, svc in compose["services"].items():
        assert svc["deploy"]["resources"]["limits"]["memory"], name


def test_services_run_the_cli_with_flags_it_accepts(specd_services):
    assert {args.command for _, args in specd_services.values()} == {*SPECD_COMMANDS, "models"}
    for name, (svc, args) in specd_services.items():
        if args.command == "models":
            assert args.models_dir == "/models" and svc["restart"] == "no"
            continue
        assert name == args.command
        assert args.host == "0.0.0.0", f"{name} listens on {args.host} only"
        assert args.port == GRPC_PORTS[name]
        assert str(args.metrics_port) in svc["expose"]


def test_every_grpc_service_is_health_checked_by_specd_health(specd_services):
    for name, (svc, args) in specd_services.items():
        if args.command == "models":
            continue
        test = svc["healthcheck"]["test"]
        assert test[0] == "CMD" and test[1] == "specd"
        health = parse_specd(test[2:], _container_env(svc))
        assert health.command == "health" and host_port(health.target) == ("127.0.0.1", args.port)
        assert health.insecure == args.insecure, f"{name}: the probe and the server disagree about TLS"
        assert svc["healthcheck"]["start_period"]


def test_plaintext_is_asked_for_explicitly_and_api_keys_come_from_the_env_file(specd_services):
    for name, (svc, args) in specd_services.items():
        if args.command != "models":
            assert args.insecure, f"{name}: the development setup is plaintext, and says so"
    gateway_env = compose_env(specd_services["gateway"][0])
    assert gateway_env["SPECD_API_KEYS"] == env_file()["SPECD_API_KEYS"] == ""


def test_the_tls_override_validates_and_turns_tls_on_for_every_hop(tmp_path):
    from common.rpc.flags import tls_config
    from gateway.main import upstream_tls_config
    assert _validate(COMPOSE_TLS).returncode == 0
    merged = _merge(load_compose(), interpolate(yaml.safe_load(COMPOSE_TLS.read_text()), env_file()))
    path = tmp_path / "merged.yml"
    path.write_text(yaml.safe_dump(merged))
    assert _validate(path).returncode == 0
    image_env = dockerfile_env(dockerfile_stages()[1][-1])
    for name in SPECD_COMMANDS:
        svc = merged["services"][name]
        env = {**image_env, **compose_env(svc)}
        args = parse_specd(svc["command"], env)
        tls = tls_config(args)
        assert tls.describe() == ("TLS" if name == "gateway" else "mTLS (client certificates required)"), name
        mounts = {v.split(":")[1]: v for v in svc["volumes"]}
        assert mounts["/etc/specd/tls"].endswith(":ro")
        assert all(p.startswith("/etc/specd/tls/") for p in (tls.cert, tls.key, tls.ca) if p)
        probe = parse_specd(svc["healthcheck"]["test"][2:], env)
        assert not probe.insecure and probe.tls_ca, f"{name}: the health check must trust the CA"
        if name == "gateway":
            assert not upstream_tls_config(args).insecure and upstream_tls_config(args).cert


def _container_env(svc: dict) -> dict[str, str]:
    return {**dockerfile_env(dockerfile_stages()[1][-1]), **compose_env(svc)}


def _merge(base: dict, override: dict) -> dict:
    """Compose's merge of an override file for what it uses: mappings merge, volumes append, the rest replaces."""
    out = dict(base)
    for key, value in override.items():
        if key == "volumes" and isinstance(value, list):
            out[key] = [*base.get(key, []), *value]
        elif isinstance(value, dict) and isinstance(base.get(key), dict):
            out[key] = _merge(base[key], value)
        else:
            out[key] = value
    return out


def test_startup_order_waits_for_health(compose):
    deps = {name: svc.get("depends_on", {}) for name, svc in compose["services"].items()}
    assert deps["gateway"]["verifier"]["condition"] == "service_healthy"
    assert deps["gateway"]["draft"]["condition"] == "service_healthy"
    for model_service in ("verifier", "draft"):
        assert deps[model_service]["models"]["condition"] == "service_completed_successfully"
        assert deps[model_service]["redis"]["condition"] == "service_healthy"
    assert "healthcheck" in compose["services"]["redis"]


def test_verifier_gpus_match_tp_and_do_not_overlap_the_draft(compose, specd_services):
    def gpu_ids(svc):
        [device] = svc["deploy"]["resources"]["reservations"]["devices"]
        assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
        return [i for entry in device["device_ids"] for i in entry.split(",")]

    verifier_svc, verifier = specd_services["verifier"]
    draft_svc, draft = specd_services["draft"]
    verifier_gpus, draft_gpus = gpu_ids(verifier_svc), gpu_ids(draft_svc)
    assert len(verifier_gpus) == len(set(verifier_gpus)) == verifier.tp == int(env_file()["TP"])
    assert len(draft_gpus) == 1 and not set(draft_gpus) & set(verifier_gpus)
    assert verifier.device == draft.device == "cuda"
    assert verifier_svc["shm_size"]                                    # NCCL needs more than Docker's 64 MB


def test_gateway_reaches_the_model_services_by_name_and_publishes_its_ports(specd_services):
    svc, gateway = specd_services["gateway"]
    for flag, target in (("verifier", gateway.verifier), ("draft", gateway.draft)):
        host, port = host_port(target)
        assert host == flag and port == specd_services[flag][1].port
    published = sorted(int(p.rsplit(":", 1)[1]) for p in svc["ports"])
    assert published == sorted([gateway.port, gateway.http_port])        # gRPC and the OpenAI HTTP API


def test_models_come_from_the_volume(compose, specd_services):
    fetched = set(specd_services["models"][1].only)
    for name, (svc, args) in specd_services.items():
        mounts = {v.split(":")[1]: v.split(":")[0] for v in svc["volumes"]}
        assert mounts["/models"] in compose["volumes"] or mounts["/models"].startswith("/")
        for path in (getattr(args, "model", None), getattr(args, "tokenizer", None)):
            if path:
                assert path.startswith("/models/") and path.split("/")[2] in fetched


def test_telemetry_and_cache_settings_point_at_their_services(compose, specd_services):
    jaeger_ports = {p.rsplit(":", 1)[1] for p in compose["services"]["jaeger"]["ports"]}
    assert {"4317", "4318", "16686"} <= jaeger_ports
    redis = compose["services"]["redis"]["command"]
    assert redis[redis.index("--maxmemory-policy") + 1] == "allkeys-lru" and "--maxmemory" in redis
    for name, (svc, args) in specd_services.items():
        if args.command == "models":
            continue
        env = compose_env(svc)
        assert env["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://jaeger:4317"
        if args.command in ("verifier", "draft"):
            assert args.redis_url == "redis://redis:6379/0"


def test_prometheus_scrapes_every_specd_service_at_its_metrics_port(specd_services):
    scrape = yaml.safe_load(PROMETHEUS.read_text())["scrape_configs"]
    targets = {job["job_name"]: host_port(t) for job in scrape for s in job["static_configs"] for t in s["targets"]}
    expected = {name: (name, args.metrics_port) for name, (_, args) in specd_services.items()
                if args.command != "models"}
    assert targets == expected
    for name, (svc, args) in specd_services.items():
        if args.command != "models":
            assert str(args.metrics_port) in svc["expose"], f"{name}: metrics port not reachable by Prometheus"


def test_prometheus_and_grafana_mount_their_config_read_only_and_publish_on_loopback(compose):
    published = {}
    for name in ("prometheus", "grafana"):
        svc = compose["services"][name]
        for volume in svc["volumes"]:
            source, target, *mode = volume.split(":")
            if source.startswith("."):                                  # a file of deploy/, not a data volume
                assert mode == ["ro"] and (DEPLOY / source).exists(), volume
            else:
                assert source in compose["volumes"], volume
        [port] = svc["ports"]
        address, on_host, in_container = port.split(":")
        assert address == "127.0.0.1", f"{name}: published beyond loopback"
        published[name] = (int(on_host), int(in_container))
    assert published == {"prometheus": (9090, 9090), "grafana": (3000, 3000)}
    grafana_env = compose_env(compose["services"]["grafana"])
    assert grafana_env["GF_AUTH_ANONYMOUS_ORG_ROLE"] == "Viewer"
    assert grafana_env["GF_SECURITY_ADMIN_PASSWORD"] == env_file()["GRAFANA_ADMIN_PASSWORD"]


def _docker_compose_available() -> bool:
    if shutil.which("docker") is None:
        return False
    return subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0


@pytest.mark.skipif(not _docker_compose_available(), reason="the docker compose plugin is not installed")
def test_docker_compose_accepts_the_file():
    proc = subprocess.run(["docker", "compose", "-f", str(COMPOSE), "--env-file", str(DEPLOY / ".env.example"),
                           "config", "--quiet"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
