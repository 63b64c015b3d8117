"""A verifier spanning two "nodes" on loopback: two `specd verifier` processes (process groups), one TP rank each,
gloo over TCP, meeting at the c10d store node 0 hosts. Greedy output through the gateway equals in-process TP=1
target-only; losing either node (killed whole, or one of its ranks) makes the driver NOT_SERVING and every node
exit with EXIT_RANK_LOST; nodes started in either order meet; a node with other engine settings is refused by
name; and a SIGTERM to both is an orderly end (exit 0). Tiny checkpoints; the real pair is test_multinode_real.py.
"""
import os
import signal
import time

import psutil
import pytest

from common.distributed import free_port
from common.llm import LLM
from common.rpc.health_check import check
from common.speculative.params import SamplingParams
from gateway.client import SpecdClient
from scripts.dev.topology import LocalTopology
from tests.checkpoints import build_model_folder, perturbed_copy
from tests.reliability import record, wait_until
from verifier_service.main import EXIT_RANK_LOST

PROMPTS = [[5, 9, 2, 77, 31], [1, 2, 3, 4, 5, 6, 7, 8, 1, 2, 3, 4], [100, 3]]
MAX_TOKENS = 24
# Two "nodes" on a 2-core machine: one thread per rank (each node would otherwise take both cores).
ENV = {"SPECD_KV_CACHE_GIB": "0.05", "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("multinode")
    target = build_model_folder(root / "target", seed=21)
    return str(target), str(perturbed_copy(target, root / "draft", noise=0.05))


def _topology(models, tmp_path, draft=True) -> LocalTopology:
    return LocalTopology(models[0], models[1] if draft else None, tp=2, nnodes=2, dtype="float32",
                         ports=(free_port(), free_port(), free_port()), k="3", log_dir=tmp_path, extra_env=ENV,
                         log_level="INFO")


def _ranks(pid: int) -> list[psutil.Process]:
    return [c for c in psutil.Process(pid).children() if "spawn_main" in " ".join(c.cmdline())]


def test_two_nodes_generate_what_one_rank_does(models, tmp_path):
    with LLM(models[0], dtype="float32", kv_cache_memory_gib=0.05) as llm:
        expected = [o.token_ids for o in llm.generate(PROMPTS, SamplingParams(max_tokens=MAX_TOKENS,
                                                                              ignore_eos=True))]
    with _topology(models, tmp_path) as topo:
        # node 0 holds rank 0 in-process (no spawned rank); node 1's launcher spawned rank 1
        assert _ranks(topo.procs["verifier"].pid) == [] and len(_ranks(topo.procs["verifier-node1"].pid)) == 1
        with SpecdClient(f"127.0.0.1:{topo.gateway_port}", timeout_s=120) as client:
            for prompt, exp in zip(PROMPTS, expected):
                reply = client.generate(prompt, max_tokens=MAX_TOKENS, ignore_eos=True)
                assert list(reply.token_ids) == exp
                assert reply.stats.drafted > 0 and reply.stats.accepted > 0
    log = (tmp_path / "verifier.log").read_text()
    assert "tp=2 over 2 node(s)" in log
    assert "worker node 1: ranks loaded" in (tmp_path / "verifier-node1.log").read_text()


@pytest.mark.parametrize("what", ["node", "rank"])
def test_losing_node_1_makes_the_driver_not_serving_and_both_exit(models, tmp_path, what):
    with _topology(models, tmp_path, draft=False) as topo:
        driver, node1 = topo.procs["verifier"], topo.procs["verifier-node1"]
        if what == "node":                          # the whole node: its launcher and its rank, SIGKILL
            os.killpg(node1.pid, signal.SIGKILL)
        else:                                       # one rank; its node's launcher notices and reports it
            (rank1,) = _ranks(node1.pid)
            rank1.kill()
        to_exit = wait_until(lambda: driver.poll() is not None, 30, "the driver exits")
        assert driver.returncode == EXIT_RANK_LOST
        serving, _ = check(f"127.0.0.1:{topo.verifier_port}", timeout_s=1)
        assert not serving
        log = (tmp_path / "verifier.log").read_text()
        assert "node 1 of 2 (tensor-parallel ranks 1-1) lost" in log
        if what == "rank":
            assert "rank 1 exited (exit code -9)" in log      # the worker node's own report, relayed
            assert wait_until(lambda: node1.poll() is not None, 10, "node 1 exits") >= 0
            assert node1.returncode == EXIT_RANK_LOST
        record(f"multinode_{what}_loss", {"driver_exit_s": round(to_exit, 2)})


def test_losing_the_driver_ends_the_worker_node(models, tmp_path):
    with _topology(models, tmp_path, draft=False) as topo:
        node1 = topo.procs["verifier-node1"]
        (rank1,) = _ranks(node1.pid)
        os.killpg(topo.procs["verifier"].pid, signal.SIGKILL)
        to_exit = wait_until(lambda: node1.poll() is not None, 30, "node 1 exits")
        assert node1.returncode == EXIT_RANK_LOST
        assert wait_until(lambda: not rank1.is_running() or rank1.status() == psutil.STATUS_ZOMBIE, 10,
                          "its rank ends") >= 0
        assert "node 1: " in (tmp_path / "verifier-node1.log").read_text()
        record("multinode_driver_loss", {"worker_exit_s": round(to_exit, 2)})


def test_sigterm_to_every_node_is_an_orderly_end(models, tmp_path):
    with _topology(models, tmp_path, draft=False) as topo:
        for name in ("verifier-node1", "verifier"):         # worker first: it waits for the driver's shutdown
            os.killpg(topo.procs[name].pid, signal.SIGTERM)
        assert topo.procs["verifier"].wait(60) == 0, (tmp_path / "verifier.log").read_text()[-3000:]
        assert topo.procs["verifier-node1"].wait(60) == 0, (tmp_path / "verifier-node1.log").read_text()[-3000:]


def test_a_worker_node_started_first_waits_for_the_driver(models, tmp_path):
    topo = _topology(models, tmp_path, draft=False)
    try:
        topo.start_verifier(nodes=[1])
        time.sleep(3)
        assert topo.procs["verifier-node1"].poll() is None  # waiting for node 0's store to appear
        topo.start_verifier(nodes=[0])
        topo.wait_serving(f"127.0.0.1:{topo.verifier_port}", "verifier", 180)
        assert topo.procs["verifier-node1"].poll() is None
    finally:
        topo.stop()


def test_a_node_with_other_settings_is_refused_by_name(models, tmp_path):
    topo = _topology(models, tmp_path, draft=False)
    topo.service_env["verifier-node1"] = {"SPECD_KV_CACHE_GIB": "0.1"}    # node 0 has 0.05
    try:
        topo.start_verifier()
        node1 = topo.procs["verifier-node1"]
        assert wait_until(lambda: node1.poll() is not None, 120, "node 1 refuses") >= 0
        assert node1.returncode == EXIT_RANK_LOST
        assert wait_until(lambda: topo.procs["verifier"].poll() is not None, 30, "the driver gives up") >= 0
        assert topo.procs["verifier"].returncode != 0
        log = (tmp_path / "verifier-node1.log").read_text()
        assert "engine settings differ from the driver's" in log and "num_kv_blocks" in log
        assert "num_kv_blocks" in (tmp_path / "verifier.log").read_text()     # the driver says why it failed
    finally:
        topo.stop()
