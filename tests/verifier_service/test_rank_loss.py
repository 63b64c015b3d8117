"""A verifier (TP=2, gloo) that loses a tensor-parallel rank, as real processes on loopback: the request streaming
through the gateway fails UNAVAILABLE within 2 s, the verifier stops answering SERVING and exits non-zero (its
orchestrator restarts it); a verifier that dies itself takes its worker rank along instead of orphaning it, and
a SIGTERM to the whole process group is still an orderly drain."""
import os
import signal
import subprocess
import sys
import time

import grpc
import psutil
import pytest

from common.distributed import free_port
from common.rpc.health_check import check
from gateway.client import SpecdClient
from scripts.dev.topology import LocalTopology
from tests.checkpoints import build_model_folder
from tests.reliability import record, wait_until
from verifier_service.main import EXIT_RANK_LOST

MAX_LEN = 2048                    # long enough that the stream is still running when the rank dies


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    return str(build_model_folder(tmp_path_factory.mktemp("rank-loss") / "target", seed=5,
                                  max_position_embeddings=MAX_LEN))


def worker_ranks(pid: int) -> list[psutil.Process]:
    """The verifier's spawned TP ranks (its other child is multiprocessing's resource tracker)."""
    return [c for c in psutil.Process(pid).children() if "spawn_main" in " ".join(c.cmdline())]


def test_a_killed_rank_fails_the_stream_unavailable_and_the_verifier_exits(target, tmp_path):
    topo = LocalTopology(target, None, tp=2, dtype="float32", ports=(free_port(), free_port(), free_port()),
                         log_dir=tmp_path, extra_env={"SPECD_KV_CACHE_GIB": "0.05"})
    topo.start(timeout_s=180)
    try:
        verifier = topo.procs["verifier"]
        (rank1,) = worker_ranks(verifier.pid)
        verifier_address = f"127.0.0.1:{topo.verifier_port}"
        with SpecdClient(f"127.0.0.1:{topo.gateway_port}", timeout_s=60) as client:
            stream = client.stream([5, 9, 2, 77], max_tokens=MAX_LEN - 16, ignore_eos=True)
            assert next(stream).token_ids                      # the request is in flight
            t = time.monotonic()
            rank1.send_signal(signal.SIGKILL)
            with pytest.raises(grpc.RpcError) as failure:
                for _ in stream:
                    pass
            to_unavailable = time.monotonic() - t
        assert failure.value.code() is grpc.StatusCode.UNAVAILABLE, failure.value.details()
        assert to_unavailable < 2.0
        serving, health = check(verifier_address, timeout_s=1)
        assert not serving and ("NOT_SERVING" in health or "UNAVAILABLE" in health), health
        to_exit = wait_until(lambda: verifier.poll() is not None, 10, "the verifier exits") + to_unavailable
        assert verifier.returncode == EXIT_RANK_LOST
        log = (tmp_path / "verifier.log").read_text()
        assert "tensor-parallel rank 1 of 2 exited (exit code -9)" in log
        assert topo.procs["gateway"].poll() is None                 # the gateway itself is unharmed
        record("verifier_rank_loss", {"to_unavailable_s": round(to_unavailable, 3), "to_exit_s": round(to_exit, 3),
                                      "health_after_failure": health.rsplit(" ", 1)[-1]})
    finally:
        topo.stop()


class BareVerifier:
    """`specd verifier --tp 2` alone, leading its own process group (its rank 1 joins it)."""

    def __init__(self, target: str, log_path):
        self.port, self.log_path = free_port(), log_path
        with open(log_path, "w") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "scripts.cli", "verifier", "--model", target, "--tp", "2", "--dtype",
                 "float32", "--kv-cache-gib", "0.05", "--port", str(self.port), "--insecure"],
                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        wait_until(lambda: check(f"127.0.0.1:{self.port}", timeout_s=1)[0] or self.proc.poll() is not None, 180,
                   "the verifier serves", interval_s=0.2)
        assert self.proc.poll() is None, log_path.read_text()[-3000:]
        (self.rank1,) = worker_ranks(self.proc.pid)

    def rank1_gone(self) -> bool:
        return not self.rank1.is_running() or self.rank1.status() == psutil.STATUS_ZOMBIE

    def kill_group(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(10)


def test_a_killed_verifier_takes_its_worker_rank_along(target, tmp_path):
    v = BareVerifier(target, tmp_path / "verifier.log")
    try:
        v.proc.send_signal(signal.SIGKILL)                  # rank 0 alone: no drain, no shutdown call
        v.proc.wait(10)
        assert wait_until(v.rank1_gone, 5, "the orphaned rank exits") < 2.0
    finally:
        v.kill_group()


def test_sigterm_to_the_process_group_still_drains_and_exits_0(target, tmp_path):
    """The worker ignores the group's SIGTERM: rank 0 drains, ends it with a shutdown call, and exits 0 (a worker
    that died first would be a lost rank, exit code 3)."""
    v = BareVerifier(target, tmp_path / "verifier.log")
    try:
        os.killpg(v.proc.pid, signal.SIGTERM)
        assert v.proc.wait(40) == 0, v.log_path.read_text()[-3000:]
        assert wait_until(v.rank1_gone, 5, "the worker rank exits")
    finally:
        v.kill_group()
