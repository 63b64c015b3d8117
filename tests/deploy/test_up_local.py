"""`specd up-local --detach` / `specd down-local` (what `make up-local` / `make down-local` run), on tiny checkpoints:
redis + verifier (TP=2) + draft + gateway come up as background processes, a request succeeds, and down-local
leaves no process and no port behind."""
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from scripts.cli import main
from common.distributed import free_port
from gateway.client import SpecdClient
from scripts.dev.topology import STATE_FILE, down
from tests.checkpoints import build_model_folder, perturbed_copy

SPECD = [sys.executable, "-m", "scripts.cli"]
REPO = Path(__file__).resolve().parents[2]


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _group(pgid: int) -> list[int]:
    out = []
    for p in psutil.process_iter(["pid", "status"]):
        try:
            if os.getpgid(p.pid) == pgid and p.info["status"] != psutil.STATUS_ZOMBIE:
                out.append(p.pid)
        except ProcessLookupError:
            pass
    return out


def _accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def _run(*argv, timeout=300):
    return subprocess.run([*SPECD, *argv], capture_output=True, text=True, timeout=timeout, cwd=REPO)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("up-local")
    target = build_model_folder(root / "target", seed=3)
    return str(target), str(perturbed_copy(target, root / "draft", noise=0.05))


@pytest.fixture()
def state_dir(tmp_path):
    yield tmp_path / "state"
    down(tmp_path / "state", grace_s=5, log=lambda _: None)     # whatever a failed test left running


@pytest.mark.slow
def test_up_detached_serves_and_down_leaves_nothing_behind(models, state_dir):
    ports = {"gateway": free_port(), "draft": free_port(), "verifier": free_port()}
    metrics = [free_port() for _ in range(3)]
    http_port = free_port()
    up = _run("up-local", "--detach", "--state-dir", str(state_dir), "--target", models[0], "--draft", models[1],
              "--tp", "2", "--dtype", "float32", "--k", "3", "--timeout", "240",
              "--gateway-port", str(ports["gateway"]), "--draft-port", str(ports["draft"]),
              "--verifier-port", str(ports["verifier"]), "--metrics-ports", ",".join(map(str, metrics)),
              "--http-port", str(http_port))
    assert up.returncode == 0, up.stdout + up.stderr                # returned: nothing runs in its foreground
    state = json.loads((state_dir / STATE_FILE).read_text())
    assert state["status"] == "up"
    with_redis = shutil.which("redis-server") is not None
    assert set(state["processes"]) == {"gateway", "draft", "verifier"} | ({"redis"} if with_redis else set())
    if not with_redis:
        assert "starting without Redis" in up.stderr
    assert {state["ports"][name] for name in ports} == set(ports.values())
    assert {state["ports"][f"{name}-metrics"] for name in ports} == set(metrics)
    assert state["ports"]["gateway-http"] == http_port
    assert all(_accepts(port) for port in state["ports"].values())     # gRPC, Prometheus and Redis listen

    # the verifier's second TP rank lives in the verifier's process group
    assert len(_group(state["processes"]["verifier"]["pid"])) >= 2
    if with_redis:
        environ = psutil.Process(state["processes"]["verifier"]["pid"]).environ()
        assert environ["REDIS_URL"] == f"redis://127.0.0.1:{state['ports']['redis']}/0"
    with SpecdClient(f"127.0.0.1:{ports['gateway']}", timeout_s=120) as client:
        reply = client.generate([5, 9, 2, 77], max_tokens=12, ignore_eos=True)
    assert len(reply.token_ids) == 12 and reply.stats.drafted > 0
    for name, port in ports.items():
        assert main(["health", "--insecure", f"127.0.0.1:{port}"]) == 0, name

    again = _run("up-local", "--detach", "--state-dir", str(state_dir), "--target", models[0], timeout=60)
    assert again.returncode == 1 and "already up" in again.stderr

    stopped = _run("down-local", "--state-dir", str(state_dir), "--grace-s", "20", timeout=120)
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr
    assert not (state_dir / STATE_FILE).exists()
    for name, rec in state["processes"].items():
        assert not _alive(rec["pid"]) and not _group(rec["pid"]), f"{name} left processes behind"
    for name, port in state["ports"].items():
        assert not _accepts(port), f"{name} port {port} still open"
    assert main(["health", "--insecure", f"127.0.0.1:{ports['gateway']}", "--timeout", "0.5"]) == 1


def test_down_kills_what_ignores_sigterm(state_dir):
    stubborn = subprocess.Popen([sys.executable, "-c", "import signal, time; signal.signal(signal.SIGTERM, "
                                 "signal.SIG_IGN); print('ready', flush=True); time.sleep(120)"],
                                stdout=subprocess.PIPE, start_new_session=True)
    assert stubborn.stdout.readline() == b"ready\n"
    _write_state(state_dir, {"draft": stubborn.pid}, {})
    assert main(["down-local", "--state-dir", str(state_dir), "--grace-s", "0.5"]) == 0
    assert stubborn.wait(timeout=10) == -signal.SIGKILL


def test_down_fails_and_names_what_is_left(state_dir, capsys):
    with socket.socket() as squatter:                       # a port someone else holds: down-local cannot close it
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        _write_state(state_dir, {}, {"gateway": port})
        assert main(["down-local", "--state-dir", str(state_dir), "--grace-s", "0.5"]) == 1
    assert f"gateway: port {port} still accepts connections" in capsys.readouterr().err
    assert (state_dir / STATE_FILE).exists()                # kept: it still describes something running
    (state_dir / STATE_FILE).unlink()


def test_down_without_state_is_a_no_op(tmp_path, capsys):
    assert main(["down-local", "--state-dir", str(tmp_path)]) == 0
    assert "nothing to stop" in capsys.readouterr().out


def _write_state(state_dir: Path, pids: dict[str, int], ports: dict[str, int]) -> None:
    state_dir.mkdir(parents=True, exist_ok=True)
    procs = {name: {"pid": pid, "started": psutil.Process(pid).create_time()} for name, pid in pids.items()}
    (state_dir / STATE_FILE).write_text(json.dumps({"status": "up", "processes": procs, "ports": ports}))
