"""A node of a multi-node tensor-parallel group that holds worker ranks only (node_rank >= 1).

It spawns its ranks (global ranks node_rank * nproc_per_node + i, each on device index i), which join the
driver's rendezvous and replay its calls exactly as the driver's own spawned ranks do (tp_executor.worker_main);
it beats a heartbeat into the driver's store, and it is the one place that sees its ranks die. Anything lost (one
of its ranks, or the driver) ends all its ranks and is reported once through `on_loss(reason)`: a group missing
a rank cannot compute, so every node of it exits and is restarted, as one verifier process would be.
An orderly end is the driver's shutdown call: every rank exits 0. No gRPC.
"""
from __future__ import annotations

import atexit
import logging
import multiprocessing as mp
import queue
import threading
import time
from collections.abc import Callable

from common.config import EngineConfig
from common.distributed import COLLECTIVE_TIMEOUT_S
from common.engine.node_watch import Heartbeat, connect_store, read_terms
from common.engine.rank_watch import RankWatch
from common.engine.tp_executor import _kill, worker_main
from common.engine.tp_layout import TPLayout, group_terms, term_differences

log = logging.getLogger(__name__)

_ORDERLY_EXIT_WAIT_S = 5.0     # the driver's store gone: how long its ranks get to show they were shut down


class WorkerNode:
    def __init__(self, config: EngineConfig, layout: TPLayout, on_loss: Callable[[str], None],
                 collective_timeout_s: float = COLLECTIVE_TIMEOUT_S):
        if layout.is_driver_node or layout.world_size != config.tp_size:
            raise ValueError(f"WorkerNode runs a worker node (node_rank >= 1) of a {config.tp_size}-rank group; "
                             f"got {layout}")
        self.layout = layout
        self._terms = group_terms(config)                               # before any rank loads: fail fast
        self._on_loss = on_loss
        self._reported = threading.Lock()
        self._done = threading.Event()
        self.loss: str | None = None
        self._store = connect_store(layout, collective_timeout_s)       # waits for the driver to come up
        ctx = mp.get_context("spawn")
        self._ready = ctx.Queue()
        self._ranks: dict[int, mp.Process] = {}
        for local, rank in enumerate(layout.local_ranks):
            p = ctx.Process(target=worker_main, daemon=True, name=f"specd-tp-rank{rank}",
                            args=(rank, config, layout.init_method, self._ready, collective_timeout_s, local,
                                  layout.nproc_per_node))
            p.start()
            self._ranks[rank] = p
        atexit.register(_kill, list(self._ranks.values()))
        self._heartbeat = Heartbeat(self._store, layout.node_rank, self._driver_lost)
        self._watch = RankWatch.of_processes(self._ranks, self._rank_ended,
                                             name=f"specd-node{layout.node_rank}-watch")
        log.info("worker node %d of %d: ranks %d-%d joining %s", layout.node_rank, layout.nnodes,
                 layout.local_ranks[0], layout.local_ranks[-1], layout.init_method)

    def wait_ready(self, timeout_s: float = 1800) -> None:
        """Block until every local rank loaded its shards (then tell the driver); RuntimeError on a failure."""
        deadline = time.monotonic() + timeout_s
        pending = set(self._ranks)
        while pending:
            if self.loss is not None:
                raise RuntimeError(f"worker node failed to start: {self.loss}")
            try:
                rank, err = self._ready.get(timeout=0.5)
            except queue.Empty:
                if time.monotonic() > deadline:
                    self._lose(f"ranks {sorted(pending)} not loaded after {timeout_s:.0f}s")
                    raise TimeoutError(self.loss) from None
                continue
            if err:
                self._lose(f"rank {rank} failed to start: {err}")
                raise RuntimeError(self.loss)
            pending.discard(rank)
        # The driver publishes its terms once every rank joined, before it loads: they are there by now.
        differences = term_differences(self._terms, read_terms(self._store, max(deadline - time.monotonic(), 1)))
        if differences:
            self._lose("its engine settings differ from the driver's (start every node with the same model and "
                       "flags): " + "; ".join(differences))
            raise RuntimeError(self.loss)
        self._heartbeat.ready()
        log.info("worker node %d: ranks loaded", self.layout.node_rank)

    def wait(self, timeout_s: float | None = None) -> bool:
        """Block until the node ended (orderly or lost); True if it did within `timeout_s`."""
        return self._done.wait(timeout_s)

    @property
    def ended_orderly(self) -> bool:
        return self._done.is_set() and self.loss is None

    def kill(self) -> None:
        self._heartbeat.stop()
        self._watch.stop()
        _kill(list(self._ranks.values()))
        self._done.set()

    # ---- what ends it --------------------------------------------------------------------------------------
    def _rank_ended(self, rank: int, exit_code: int | None) -> None:
        if exit_code == 0 and self._all_exited_orderly(_ORDERLY_EXIT_WAIT_S):
            self._heartbeat.stop()
            log.info("worker node %d: the driver shut the group down", self.layout.node_rank)
            self._done.set()
            return
        self._lose(f"rank {rank} exited (exit code {exit_code})")

    def _driver_lost(self, reason: str) -> None:
        if self._all_exited_orderly(_ORDERLY_EXIT_WAIT_S):     # the driver ended after shutting the ranks down
            self._watch.stop()
            self._done.set()
            return
        self._lose(reason)

    def _all_exited_orderly(self, wait_s: float) -> bool:
        deadline = time.monotonic() + wait_s
        for p in self._ranks.values():
            p.join(timeout=max(deadline - time.monotonic(), 0))
        return all(p.exitcode == 0 for p in self._ranks.values())

    def _lose(self, reason: str) -> None:
        if not self._reported.acquire(blocking=False):
            return
        self.loss = f"node {self.layout.node_rank}: {reason}"
        log.error("%s: ending this node's ranks", self.loss)
        self._heartbeat.report_lost(reason)
        self._heartbeat.stop()
        _kill(list(self._ranks.values()))
        self._done.set()
        try:
            self._on_loss(self.loss)
        except Exception:  # noqa: BLE001
            log.exception("node-loss handler failed")
