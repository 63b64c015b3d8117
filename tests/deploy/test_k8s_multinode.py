"""deploy/k8s/multinode/: a multi-node verifier group as a StatefulSet, validated strictly offline, and its
invariants: every pod's `specd verifier` line parses into a TPLayout whose node rank is the pod's ordinal,
replicas = nnodes, GPUs per pod = ranks per node, one pod per node, the rendezvous endpoint is pod 0 through a
headless Service that publishes pods before they are ready, and gateways reach pod 0 only."""
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from common.engine.tp_layout import TPLayout
from tests.deploy.manifests import K8S, container_env, dockerfile_env, dockerfile_stages, find, k8s_objects, parse_specd

MULTINODE = K8S / "multinode"
KUBERNETES_VALIDATE = Path(sys.executable).parent / "kubernetes-validate"
POD_INDEX = "<field metadata.labels['apps.kubernetes.io/pod-index']>"


@pytest.fixture(scope="module")
def objects():
    return [doc for p in sorted(MULTINODE.glob("*.yaml")) if p.name != "kustomization.yaml"
            for doc in yaml.safe_load_all(p.read_text()) if doc]


@pytest.fixture(scope="module")
def group(objects):
    [sts] = [o for o in objects if o["kind"] == "StatefulSet"]
    [container] = sts["spec"]["template"]["spec"]["containers"]
    env = {**dockerfile_env(dockerfile_stages()[1][-1]), **container_env(container, k8s_objects() + objects)}
    return sts, container, env


def test_multinode_manifests_validate_strictly_offline():
    files = [str(p) for p in sorted(MULTINODE.glob("*.yaml")) if p.name != "kustomization.yaml"]
    proc = subprocess.run([str(KUBERNETES_VALIDATE), "--strict", "--quiet", "-k", "1.31.0", *files],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_kustomization_lists_the_files_and_the_namespace(objects):
    k = yaml.safe_load((MULTINODE / "kustomization.yaml").read_text())
    assert sorted(k["resources"]) == sorted(p.name for p in MULTINODE.glob("*.yaml") if p.name != "kustomization.yaml")
    assert all(o["metadata"]["namespace"] == k["namespace"] == "specd" for o in objects)


def test_every_pod_parses_into_the_layout_its_ordinal_says(group):
    sts, container, env = group
    assert env["SPECD_NODE_RANK"] == POD_INDEX          # the downward API gives each pod its ordinal
    replicas = sts["spec"]["replicas"]
    for ordinal in range(replicas):
        args = parse_specd(container["args"], {**env, "SPECD_NODE_RANK": str(ordinal)})
        assert args.command == "verifier"
        layout = TPLayout.build(args.tp, args.nnodes, args.node_rank, args.nproc_per_node, args.rdzv_endpoint,
                                env={})
        assert layout.nnodes == replicas and layout.node_rank == ordinal
        gpus = int(container["resources"]["limits"]["nvidia.com/gpu"])
        assert gpus == int(container["resources"]["requests"]["nvidia.com/gpu"]) == layout.nproc_per_node


def test_the_rendezvous_is_pod_0_through_a_headless_service_that_publishes_unready_pods(group, objects):
    sts, container, env = group
    args = parse_specd(container["args"], {**env, "SPECD_NODE_RANK": "0"})
    host, port = TPLayout.build(args.tp, args.nnodes, 0, None, args.rdzv_endpoint, env={}).host_port
    nodes = find(objects, "Service", sts["spec"]["serviceName"])
    assert host.split(".")[:3] == [f"{sts['metadata']['name']}-0", nodes["metadata"]["name"], "specd"]
    assert nodes["spec"]["clusterIP"] == "None" and nodes["spec"]["publishNotReadyAddresses"] is True
    assert nodes["spec"]["selector"].items() <= sts["spec"]["template"]["metadata"]["labels"].items()
    assert port in {p["containerPort"] for p in container["ports"]}
    assert port in {p["port"] for p in nodes["spec"]["ports"]}


def test_one_pod_per_node_started_together(group):
    sts, _, _ = group
    spec = sts["spec"]
    assert spec["podManagementPolicy"] == "Parallel"
    [term] = spec["template"]["spec"]["affinity"]["podAntiAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    assert term["topologyKey"] == "kubernetes.io/hostname"
    assert term["labelSelector"]["matchLabels"].items() <= spec["template"]["metadata"]["labels"].items()


def test_gateways_reach_pod_0_only_and_probes_hit_the_health_port(group, objects):
    sts, container, env = group
    driver = find(objects, "Service", "verifier-tp-driver")
    assert driver["spec"]["selector"] == {"statefulset.kubernetes.io/pod-name": f"{sts['metadata']['name']}-0"}
    args = parse_specd(container["args"], {**env, "SPECD_NODE_RANK": "0"})
    grpc_port = next(p for p in container["ports"] if p["name"] == "grpc")["containerPort"]
    assert args.port == grpc_port
    assert next(p for p in driver["spec"]["ports"] if p["name"] == "grpc")["targetPort"] == "grpc"
    health = int(env["SPECD_HEALTH_PORT"])
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["grpc"]["port"] == health
    # the drain: node 0's grace plus the other nodes' wait for its shutdown call fit the termination grace
    assert sts["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] > args.grace_s
