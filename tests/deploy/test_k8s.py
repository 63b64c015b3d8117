"""deploy/k8s/: every manifest valid against the Kubernetes schemas (offline, strict), and the project's invariants:
flags the CLI accepts, ports and probes that agree, GPUs = --tp, resources everywhere, pinned images."""
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.deploy.manifests import (GRPC_PORTS, K8S, SPECD_COMMANDS, container_env, dockerfile_env,
                                    dockerfile_stages, find, host_port, image_tag, k8s_files, k8s_objects,
                                    parse_specd, pod_specs)

KUBERNETES_VALIDATE = Path(sys.executable).parent / "kubernetes-validate"
KUBERNETES_VERSION = "1.31.0"       # one of the schema sets the kubernetes-validate wheel ships (no network)


@pytest.fixture(scope="module")
def objects():
    return k8s_objects()


@pytest.fixture(scope="module")
def services(objects):
    """gRPC service name → (pod spec, main container, parsed `specd` arguments under the container's env)."""
    image_env = dockerfile_env(dockerfile_stages()[1][-1])
    out = {}
    for name, spec in pod_specs(objects).items():
        [container] = spec["containers"]
        if container["image"].split(":")[0] == "specd":
            args = parse_specd(container["args"], {**image_env, **container_env(container, objects)})
            out[args.command] = (spec, container, args)
    return out


def _all_containers(objects):
    for workload, spec in pod_specs(objects).items():
        for container in spec.get("initContainers", []) + spec["containers"]:
            yield workload, container


def test_manifests_validate_strictly_offline():
    proc = subprocess.run([str(KUBERNETES_VALIDATE), "--strict", "--quiet", "-k", KUBERNETES_VERSION,
                           *map(str, k8s_files())], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_the_validator_rejects_an_unknown_field(tmp_path, objects):
    bad = dict(find(objects, "Service", "gateway"))
    bad["spec"] = {**bad["spec"], "sesionAffinity": "ClientIP"}
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(bad))
    proc = subprocess.run([str(KUBERNETES_VALIDATE), "--strict", "--quiet", "-k", KUBERNETES_VERSION, str(path)],
                          capture_output=True, text=True)
    assert proc.returncode != 0 and "sesionAffinity" in proc.stdout + proc.stderr


def test_kustomization_lists_every_manifest_and_sets_the_namespace(objects):
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert sorted(kustomization["resources"]) == sorted(p.name for p in k8s_files())
    [namespace] = [o for o in objects if o["kind"] == "Namespace"]
    assert kustomization["namespace"] == namespace["metadata"]["name"]
    assert all(o["metadata"].get("namespace") == kustomization["namespace"] for o in objects if o is not namespace)
    [image] = kustomization["images"]
    tags = {c["image"] for _, c in _all_containers(objects) if c["image"].split(":")[0] == image["name"]}
    assert tags == {f"{image['name']}:{image['newTag']}"}


def test_every_container_has_requests_and_limits_and_a_pinned_image(objects):
    for workload, container in _all_containers(objects):
        where = f"{workload}/{container['name']}"
        for kind in ("requests", "limits"):
            assert {"cpu", "memory"} <= container["resources"][kind].keys(), f"{where}: {kind}"
        tag = image_tag(container["image"])
        assert tag and tag != "latest", f"{where}: image {container['image']} is not pinned"


def test_services_run_the_cli_with_flags_it_accepts(services):
    assert set(services) == set(SPECD_COMMANDS)
    for name, (_, container, args) in services.items():
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        assert args.host == "0.0.0.0", f"{name} listens on {args.host} only"
        assert args.port == ports["grpc"] == GRPC_PORTS[name]
        assert args.metrics_port == ports["metrics"]


def test_every_grpc_service_has_grpc_startup_readiness_and_liveness_probes(services):
    # kubelet's grpc probe speaks no TLS: it asks the plaintext health-only port (--health-port).
    for name, (_, container, args) in services.items():
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        assert args.health_port == ports["health"] and args.health_port not in (0, args.port), name
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert container[probe]["grpc"]["port"] == args.health_port, f"{name}: {probe}"


def test_no_service_runs_plaintext_and_the_model_services_require_client_certificates(services, objects):
    """TLS on every hop: each service serves the specd-tls certificate, mounted read-only from the Secret; the
    draft and the verifier require client certificates from its CA (mTLS), and the gateway presents one."""
    for workload, container in _all_containers(objects):
        env = container_env(container, objects)
        assert env.get("SPECD_INSECURE", "0").lower() not in ("1", "true", "yes", "on"), workload
        assert env.get("SPECD_UPSTREAM_INSECURE", "0").lower() not in ("1", "true", "yes", "on"), workload
        assert "--insecure" not in container.get("args", []) and "--upstream-insecure" not in container.get("args", [])
    from common.rpc.flags import tls_config
    from gateway.main import upstream_tls_config
    for name, (spec, container, args) in services.items():
        assert not args.insecure, f"{name} runs with --insecure"
        assert tls_config(args).describe() == ("TLS" if name == "gateway" else "mTLS (client certificates required)")
        [mount] = [m for m in container["volumeMounts"] if m["mountPath"] == "/etc/specd/tls"]
        assert mount.get("readOnly") is True, name
        [volume] = [v for v in spec["volumes"] if v["name"] == mount["name"]]
        assert volume["secret"]["secretName"] == "specd-tls" and volume["secret"]["defaultMode"] & 0o007 == 0
        paths = [args.tls_cert, args.tls_key] + ([args.tls_ca] if name != "gateway" else [])
        assert all(p and p.startswith("/etc/specd/tls/") for p in paths), f"{name}: {paths}"
        if name == "gateway":
            assert args.tls_ca is None, "the gateway's clients authenticate with API keys, not certificates"
            assert not args.upstream_insecure and not upstream_tls_config(args).insecure
            upstream = [args.upstream_tls_ca, args.upstream_tls_cert, args.upstream_tls_key]
            assert all(p and p.startswith("/etc/specd/tls/") for p in upstream), upstream
            assert container_env(container, objects)["SPECD_API_KEYS"] == "<secret specd-api-keys/keys>"
        else:
            assert args.tls_ca, f"{name} must require client certificates (mTLS)"


def test_verifier_startup_probe_allows_a_model_load(services):
    probe = services["verifier"][1]["startupProbe"]
    assert probe["periodSeconds"] * probe["failureThreshold"] >= 600


def test_gpu_requests_equal_limits_equal_tp(services):
    for name, want in (("verifier", services["verifier"][2].tp), ("draft", 1)):
        resources = services[name][1]["resources"]
        assert int(resources["requests"]["nvidia.com/gpu"]) == int(resources["limits"]["nvidia.com/gpu"]) == want
        assert services[name][2].device == "cuda"
    assert "nvidia.com/gpu" not in services["gateway"][1]["resources"]["limits"]


def test_verifier_has_a_memory_backed_dev_shm(services):
    spec, container, _ = services["verifier"]
    [mount] = [m for m in container["volumeMounts"] if m["mountPath"] == "/dev/shm"]
    [volume] = [v for v in spec["volumes"] if v["name"] == mount["name"]]
    assert volume["emptyDir"]["medium"] == "Memory" and volume["emptyDir"]["sizeLimit"]


def test_model_paths_are_fetched_by_the_init_container_into_the_mounted_volume(services, objects):
    for name, (spec, container, args) in services.items():
        path = args.model if name != "gateway" else args.tokenizer
        [init] = spec["initContainers"]
        fetch = parse_specd(init["args"], {})
        assert (fetch.command, fetch.models_command, fetch.models_dir) == ("models", "fetch", "/models")
        assert path.startswith("/models/") and path.split("/")[2] in fetch.only
        claims = {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in spec["volumes"]
                  if "persistentVolumeClaim" in v}
        for c in (init, container):
            [mount] = [m for m in c["volumeMounts"] if m["mountPath"] == "/models"]
            find(objects, "PersistentVolumeClaim", claims[mount["name"]])


def test_services_route_to_their_pods(objects, services):
    workloads = {o["metadata"]["name"]: o for o in objects if o["kind"] in ("Deployment", "StatefulSet")}
    for svc in (o for o in objects if o["kind"] == "Service"):
        pods = [w for w in workloads.values()
                if svc["spec"]["selector"].items() <= w["spec"]["template"]["metadata"]["labels"].items()]
        assert len(pods) == 1, f"Service {svc['metadata']['name']} selects {len(pods)} workloads"
        named = {p["name"] for c in pods[0]["spec"]["template"]["spec"]["containers"] for p in c["ports"]}
        for port in svc["spec"]["ports"]:
            assert port["targetPort"] in named
    # the gateway dials the verifier and the draft through their Services, on their gRPC ports
    gateway = services["gateway"][2]
    for target, name in ((gateway.verifier, "verifier"), (gateway.draft, "draft")):
        host, port = host_port(target)
        svc = find(objects, "Service", host)
        assert {p["port"] for p in svc["spec"]["ports"] if p["name"] == "grpc"} == {services[name][2].port}


def test_verifier_sessions_are_sticky_and_disruptions_bounded(objects):
    assert find(objects, "Service", "verifier")["spec"]["sessionAffinity"] == "ClientIP"
    statefulset = find(objects, "StatefulSet", "verifier")
    find(objects, "Service", statefulset["spec"]["serviceName"])
    pdb = find(objects, "PodDisruptionBudget", "verifier")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= statefulset["spec"]["template"]["metadata"]["labels"].items()
    assert pdb["spec"].get("maxUnavailable", 0) < statefulset["spec"]["replicas"]


def test_autoscalers_target_the_stateless_deployments(objects):
    hpas = {o["metadata"]["name"]: o for o in objects if o["kind"] == "HorizontalPodAutoscaler"}
    assert set(hpas) == {"draft", "gateway"}
    for name, hpa in hpas.items():
        ref = hpa["spec"]["scaleTargetRef"]
        assert (ref["kind"], ref["name"]) == ("Deployment", name)
        find(objects, "Deployment", name)
        assert 1 <= hpa["spec"]["minReplicas"] < hpa["spec"]["maxReplicas"]


def test_telemetry_and_cache_settings_point_at_their_services(objects, services):
    jaeger = find(objects, "Service", "jaeger")
    assert {4317, 4318, 16686} <= {p["port"] for p in jaeger["spec"]["ports"]}
    redis = find(objects, "Deployment", "redis")["spec"]["template"]["spec"]["containers"][0]["args"]
    assert redis[redis.index("--maxmemory-policy") + 1] == "allkeys-lru" and "--maxmemory" in redis
    assert 6379 in {p["port"] for p in find(objects, "Service", "redis")["spec"]["ports"]}
    for name, (_, container, args) in services.items():
        assert container_env(container, objects)["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://jaeger:4317"
        if name != "gateway":
            assert args.redis_url == "redis://redis:6379/0"
