"""Verifier replicas with session routing and a draft pool, as real processes on loopback (tiny checkpoints):
two verifiers and two drafts behind one gateway. Sessions spread over the verifiers; a verifier killed mid-run
moves its sessions (re-prefilled from the gateway's history) and every output equals an uninterrupted run's; a
draft killed mid-run fails no request; a replica that comes up takes new sessions."""
import concurrent.futures as cf
import os
import signal
import subprocess
import sys
import time

import pytest

from common.distributed import free_port
from gateway.client import SpecdClient
from scripts.dev.metrics_scrape import scrape_by_label
from tests.checkpoints import build_model_folder, perturbed_copy
from tests.reliability import ServiceProcess, insecure_flag, wait_until

N = 16
MAX_TOKENS = 48
PROMPTS = [[3 + (7 * i + j) % 100 for j in range(6 + i % 5)] for i in range(N)]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("replicas")
    target = build_model_folder(root / "target", seed=31)
    return str(target), str(perturbed_copy(target, root / "draft", noise=0.05))


class Gateway:
    def __init__(self, tokenizer: str, verifiers: list[str], drafts: list[str], log_dir):
        self.port, self.metrics_port = free_port(), free_port()
        self.log_path = log_dir / "gateway.log"
        with open(self.log_path, "w") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "scripts.cli", "gateway", "--tokenizer", tokenizer, "--k", "3",
                 "--port", str(self.port), "--http-port", "0", "--metrics-port", str(self.metrics_port),
                 "--verifier", ",".join(verifiers), "--draft", ",".join(drafts), "--verifier-refresh-s", "0.5",
                 *insecure_flag("gateway")], stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                env={**os.environ})

    def routed(self) -> dict[str, float]:
        return scrape_by_label(self.metrics_port, "specd_verifier_routed_sessions_total", "replica")

    def stop(self):
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(30)


@pytest.fixture(scope="module")
def cluster(models, tmp_path_factory):
    logs = tmp_path_factory.mktemp("replica-logs")
    target, draft = models
    verifiers = [ServiceProcess("verifier", target, logs, "--tp", "1") for _ in range(2)]
    drafts = [ServiceProcess("draft", draft, logs) for _ in range(2)]
    spare_port = free_port()                   # a third verifier's address, listed now, started by the last test
    procs = [*verifiers, *drafts]
    gw = None
    try:
        for p in procs:
            p.wait_serving(180)
        gw = Gateway(target, [v.address for v in verifiers] + [f"127.0.0.1:{spare_port}"],
                     [d.address for d in drafts], logs)
        from common.rpc.health_check import check
        wait_until(lambda: check(f"127.0.0.1:{gw.port}", timeout_s=1)[0], 120, "gateway SERVING", 0.2)
        yield {"gateway": gw, "verifiers": verifiers, "drafts": drafts, "spare_port": spare_port, "logs": logs,
               "target": target, "procs": procs}
    finally:
        if gw is not None:
            gw.stop()
        for p in procs:
            p.stop()


def _generate_all(gw: Gateway, during=None) -> list[list[int]]:
    """The N prompts concurrently, greedy; `during()` runs once every request has produced a few tokens."""
    with SpecdClient(f"127.0.0.1:{gw.port}", timeout_s=300) as client:
        def one(p):
            return list(client.generate(p, max_tokens=MAX_TOKENS, ignore_eos=True).token_ids)
        with cf.ThreadPoolExecutor(N) as pool:
            futures = [pool.submit(one, p) for p in PROMPTS]
            if during is not None:
                during()
            return [f.result() for f in futures]


@pytest.fixture(scope="module")
def reference(cluster):
    gw = cluster["gateway"]
    before = gw.routed()
    outputs = _generate_all(gw)
    after = gw.routed()
    return outputs, {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after}


def test_sessions_spread_over_the_verifier_replicas(cluster, reference):
    _, routed = reference
    shares = {v.address: routed.get(v.address, 0.0) / N for v in cluster["verifiers"]}
    print(f"sessions per verifier: {shares}")
    assert sum(routed.values()) == N
    assert all(share >= 0.3 for share in shares.values()), shares


def test_proposes_are_balanced_over_the_draft_replicas(cluster, reference):
    batches = [d.scrape().get("specd_draft_batch_size_count", 0.0) for d in cluster["drafts"]]
    print(f"draft batches per replica: {batches}")
    assert all(b >= 0.3 * sum(batches) for b in batches), batches


def test_a_verifier_killed_mid_run_changes_no_output(cluster, reference):
    gw, victim = cluster["gateway"], cluster["verifiers"][0]
    expected, _ = reference

    def kill_one():
        time.sleep(1.0)                                    # every request is some rounds in
        os.killpg(victim.proc.pid, signal.SIGKILL)
    outputs = _generate_all(gw, during=kill_one)
    victim.proc.wait(30)
    moved = scrape_by_label(gw.metrics_port, "specd_verifier_session_moves_total", "reason")
    print(f"session moves: {moved}")
    assert outputs == expected
    assert sum(moved.values()) > 0, "the kill came after every request had finished: the test proved nothing"


def test_a_draft_killed_mid_run_fails_no_request(cluster, reference):
    gw, victim = cluster["gateway"], cluster["drafts"][0]
    expected, _ = reference

    def kill_one():
        time.sleep(1.0)
        os.killpg(victim.proc.pid, signal.SIGKILL)
    outputs = _generate_all(gw, during=kill_one)
    assert outputs == expected                             # greedy: drafts change speed, never tokens


def test_a_replica_that_comes_up_takes_new_sessions(cluster, reference):
    gw = cluster["gateway"]
    logs, target = cluster["logs"], cluster["target"]
    spare = ServiceProcess("verifier", target, logs, "--tp", "1", port=cluster["spare_port"])
    cluster["procs"].append(spare)
    spare.wait_serving(180)
    wait_until(lambda: _healthy(gw) >= 2, 30, "the gateway sees the new replica", 0.2)
    before = gw.routed().get(spare.address, 0.0)
    expected, _ = reference
    outputs = _generate_all(gw)
    assert outputs == expected
    assert gw.routed().get(spare.address, 0.0) - before >= N * 0.3


def _healthy(gw: Gateway) -> float:
    return scrape_by_label(gw.metrics_port, "specd_verifier_replicas", "state").get("healthy", 0.0)


def test_a_verifier_drained_mid_run_moves_its_sessions_and_changes_no_output(cluster, reference):
    """A SIGTERM (a rolling update, a node drain): the replica finishes the calls in flight, refuses the next
    ones, and the gateway re-prefills those sessions on the replica left; the drained one exits 0."""
    gw, victim = cluster["gateway"], cluster["verifiers"][1]
    expected, _ = reference
    before = sum(scrape_by_label(gw.metrics_port, "specd_verifier_session_moves_total", "reason").values())

    def drain_one():
        time.sleep(1.0)
        victim.proc.send_signal(signal.SIGTERM)
    outputs = _generate_all(gw, during=drain_one)
    moved = sum(scrape_by_label(gw.metrics_port, "specd_verifier_session_moves_total", "reason").values()) - before
    print(f"sessions moved off the draining replica: {moved}")
    assert outputs == expected
    assert moved > 0, "the drain came after every request had finished: the test proved nothing"
    assert victim.proc.wait(60) == 0
