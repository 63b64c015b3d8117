"""Reading deploy/ the way Docker, Compose and Kubernetes would: Dockerfile stages, compose interpolation, and the
`specd` command line of a container parsed by the real argparse parser under the container's environment."""
from __future__ import annotations

import os
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from unittest import mock

import yaml

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
K8S = DEPLOY / "k8s"
SPECD_COMMANDS = ("verifier", "draft", "gateway")       # the gRPC services
GRPC_PORTS = {"gateway": 50051, "draft": 50052, "verifier": 50053}

_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::?-([^}]*))?\}")


# ---- Dockerfile ---------------------------------------------------------------------------------------------------

@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)   # (INSTRUCTION, rest of the line)

    def all(self, instruction: str) -> list[str]:
        return [rest for ins, rest in self.instructions if ins == instruction]


def dockerfile_stages(path: Path = DEPLOY / "Dockerfile") -> tuple[dict[str, str], list[Stage]]:
    """(global ARG defaults, stages in order); continuation lines joined, comments dropped, ARGs substituted in FROM."""
    lines, buf = [], ""
    for raw in path.read_text().splitlines():
        if raw.lstrip().startswith("#") or not raw.strip():
            continue
        if raw.rstrip().endswith("\\"):
            buf += raw.rstrip()[:-1] + " "
            continue
        lines.append((buf + raw).strip())
        buf = ""
    args, stages = {}, []
    for line in lines:
        ins, _, rest = line.partition(" ")
        ins = ins.upper()
        if ins == "FROM":
            words = rest.split()
            base = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], words[0])
            stages.append(Stage(base, words[2] if len(words) == 3 and words[1].upper() == "AS" else None))
        elif not stages and ins == "ARG":
            name, _, default = rest.partition("=")
            args[name] = default
        else:
            stages[-1].instructions.append((ins, rest.strip()))
    return args, stages


def dockerfile_env(stage: Stage) -> dict[str, str]:
    env = {}
    for rest in stage.all("ENV"):
        for item in shlex.split(rest):
            key, _, value = item.partition("=")
            env[key] = value
    return env


# ---- compose --------------------------------------------------------------------------------------------------------

def env_file(path: Path = DEPLOY / ".env.example") -> dict[str, str]:
    out = {}
    for line in path.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.partition("=")
            out[key.strip()] = value.strip()
    return out


def compose_variables(text: str) -> dict[str, str | None]:
    """Each ${VAR:-default} the compose file uses, with its default (None when it has none)."""
    return {m.group(1): m.group(2) for m in _VAR.finditer(text)}


def interpolate(obj, env: dict[str, str]):
    """Compose's ${VAR} / ${VAR:-default} substitution over a loaded YAML tree."""
    if isinstance(obj, dict):
        return {k: interpolate(v, env) for k, v in obj.items()}
    if isinstance(obj, list):
        return [interpolate(v, env) for v in obj]
    if isinstance(obj, str):
        return _VAR.sub(lambda m: env.get(m.group(1)) or m.group(2) or "", obj)
    return obj


def load_compose(env: dict[str, str] | None = None) -> dict:
    doc = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    return interpolate(doc, env if env is not None else env_file())


def compose_env(service: dict) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: str(v) for k, v in env.items()}


# ---- Kubernetes -----------------------------------------------------------------------------------------------------

def k8s_files() -> list[Path]:
    return sorted(p for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")


def k8s_objects() -> list[dict]:
    return [doc for path in k8s_files() for doc in yaml.safe_load_all(path.read_text()) if doc]


def find(objects: list[dict], kind: str, name: str) -> dict:
    matches = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(matches) == 1, f"expected one {kind}/{name}, found {len(matches)}"
    return matches[0]


def pod_specs(objects: list[dict]) -> dict[str, dict]:
    """Workload name → its pod template spec."""
    return {o["metadata"]["name"]: o["spec"]["template"]["spec"] for o in objects
            if o["kind"] in ("Deployment", "StatefulSet", "DaemonSet", "Job")}


def container_env(container: dict, objects: list[dict]) -> dict[str, str]:
    """The container's environment; a value from a Secret (not in the repository) reads `<secret NAME/KEY>`."""
    env = {}
    for source in container.get("envFrom", []):
        env.update(find(objects, "ConfigMap", source["configMapRef"]["name"])["data"])
    for e in container.get("env", []):
        source = e.get("valueFrom", {})
        if "secretKeyRef" in source:
            ref = source["secretKeyRef"]
            env[e["name"]] = f"<secret {ref['name']}/{ref['key']}>"
        elif "fieldRef" in source:                  # the downward API: filled in by the kubelet
            env[e["name"]] = f"<field {source['fieldRef']['fieldPath']}>"
        else:
            env[e["name"]] = e["value"]
    return env


# ---- the specd command line ----------------------------------------------------------------------------------------

def parse_specd(argv: list[str], env: dict[str, str]):
    """Parse a container's `specd ...` arguments exactly as the image would: the flags' defaults come from SPECD_*
    (and REDIS_URL) variables, read from the container's environment alone, not this test process's."""
    from scripts.cli import build_parser
    with mock.patch.dict(os.environ, env, clear=True):
        return build_parser().parse_args(argv)


def host_port(target: str) -> tuple[str, int]:
    host, _, port = target.rpartition(":")
    return host, int(port)


def image_tag(image: str) -> str | None:
    """The tag of `repo[:port]/name:tag`, or None when there is none (digests count as pinned)."""
    if "@sha256:" in image:
        return image.split("@", 1)[1]
    last = image.rsplit("/", 1)[-1]
    return last.split(":", 1)[1] if ":" in last else None
