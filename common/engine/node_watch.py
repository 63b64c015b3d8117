"""Liveness across nodes: a worker node's heartbeat in the driver's rendezvous store, and the driver's watch on it.

On one node a peer's death is seen through its process sentinel (RankWatch). A rank on another node has no
sentinel here, and a collective with it may block until its timeout (30 minutes) when the node vanishes without
closing its sockets. So, as torch elastic's c10d rendezvous keeps its members alive, each worker node counts a
key up every HEARTBEAT_S in the c10d TCPStore the driver hosts for the rendezvous, and says why it ends when it
can (`lost`); the driver's NodeWatch reports a node whose count stops for DEAD_AFTER_S, or that said it is lost.
The store lives in the driver's process: a worker node whose heartbeat fails has lost the driver.
No gRPC.
"""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from datetime import timedelta

from common.engine.tp_layout import TPLayout

log = logging.getLogger(__name__)

HEARTBEAT_S = 1.0
DEAD_AFTER_S = 10.0          # a node silent this long is lost (ten missed beats: never a GC pause or a slow disk)


TERMS_KEY = "specd/terms"     # the driver's group_terms, as JSON: every worker node checks its own against them


def _key(kind: str, node: int) -> str:
    return f"specd/{kind}/{node}"


def publish_terms(store, terms: dict) -> None:
    import json
    store.set(TERMS_KEY, json.dumps(terms, sort_keys=True).encode())


def read_terms(store, timeout_s: float) -> dict:
    import json
    store.wait([TERMS_KEY], timedelta(seconds=timeout_s))
    return json.loads(store.get(TERMS_KEY))


def connect_store(layout: TPLayout, connect_timeout_s: float):
    """A client of the driver's rendezvous store; waits up to `connect_timeout_s` for the driver to come up (pods
    start in any order), then fails any store call after DEAD_AFTER_S."""
    import torch.distributed as dist
    host, port = layout.host_port
    store = dist.TCPStore(host, port, is_master=False, timeout=timedelta(seconds=connect_timeout_s))
    store.set_timeout(timedelta(seconds=DEAD_AFTER_S))
    return store


class Heartbeat:
    """A worker node's side: beats until stopped; `on_driver_lost(reason)` once if the store stops answering."""

    def __init__(self, store, node: int, on_driver_lost: Callable[[str], None]):
        self._store = store
        self._node = node
        self._on_driver_lost = on_driver_lost
        self._stopped = threading.Event()
        self._lock = threading.Lock()           # one store call at a time on this client
        self._thread = threading.Thread(target=self._loop, name=f"specd-node{node}-heartbeat", daemon=True)
        self._thread.start()

    def ready(self) -> None:
        with self._lock:
            self._store.set(_key("ready", self._node), b"1")

    def report_lost(self, reason: str) -> None:
        """Tell the driver why this node ends (best effort: the driver may be gone already)."""
        try:
            with self._lock:
                self._store.set(_key("lost", self._node), reason.encode())
        except Exception as e:  # noqa: BLE001 - the heartbeat's silence says it anyway
            log.warning("could not report the loss to the driver: %s", e)

    def stop(self) -> None:
        self._stopped.set()

    def _loop(self) -> None:
        while not self._stopped.wait(HEARTBEAT_S):
            try:
                with self._lock:
                    self._store.add(_key("beat", self._node), 1)
            except Exception as e:  # noqa: BLE001 - the store is the driver's: it is gone or unreachable
                if not self._stopped.is_set():
                    self._on_driver_lost(f"the driver's rendezvous store stopped answering ({e})")
                return


class NodeWatch:
    """The driver's side: watches worker nodes 1..nnodes-1 through their keys; the first loss is reported once, as
    `on_loss(rank, reason)` with the node's first rank. Also tells when every node said it is ready."""

    def __init__(self, store, layout: TPLayout, on_loss: Callable[[int, str], None],
                 dead_after_s: float = DEAD_AFTER_S):
        self._store = store
        self._layout = layout
        self._on_loss = on_loss
        self._dead_after_s = dead_after_s
        self._nodes = list(range(1, layout.nnodes))
        self._ready: set[int] = set()
        self._all_ready = threading.Event()
        self._lost = threading.Event()
        self._stopped = threading.Event()
        self.lost_rank: int | None = None
        self.lost_reason: str | None = None
        self._thread = threading.Thread(target=self._loop, name="specd-node-watch", daemon=True)
        self._thread.start()

    @property
    def lost(self) -> bool:
        return self._lost.is_set()

    def wait_lost(self, timeout_s: float) -> bool:
        return self._lost.wait(timeout_s)

    def wait_ready(self, timeout_s: float) -> bool:
        """True once every worker node loaded its ranks; False on a loss or after `timeout_s`."""
        deadline = time.monotonic() + timeout_s
        while not self._all_ready.wait(0.2):
            if self.lost or time.monotonic() > deadline:
                return False
        return True

    def stop(self) -> None:
        self._stopped.set()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=5)

    def _loop(self) -> None:
        now = time.monotonic()
        beats = {node: (-1, now) for node in self._nodes}       # node -> (last count, when it last moved)
        while not self._stopped.wait(HEARTBEAT_S / 2):
            try:
                reason = self._check(beats)
            except Exception as e:  # noqa: BLE001 - the store is in this process; say it and keep watching
                log.warning("node watch: rendezvous store read failed: %s", e)
                continue
            if reason is not None and not self._stopped.is_set():
                node, why = reason
                ranks = self._layout.ranks_of(node)
                self.lost_rank = ranks[0]
                self.lost_reason = (f"node {node} of {self._layout.nnodes} (tensor-parallel ranks "
                                    f"{ranks[0]}-{ranks[-1]}) lost: {why}")
                self._lost.set()
                log.error("%s: the group is broken", self.lost_reason)
                try:
                    self._on_loss(ranks[0], self.lost_reason)
                except Exception:  # noqa: BLE001
                    log.exception("node-loss handler failed")
                return

    def _check(self, beats: dict[int, tuple[int, float]]) -> tuple[int, str] | None:
        now = time.monotonic()
        for node in self._nodes:
            if self._store.check([_key("lost", node)]):
                return node, self._store.get(_key("lost", node)).decode(errors="replace")
            count = self._store.add(_key("beat", node), 0)
            last, since = beats[node]
            if count != last:
                beats[node] = (count, now)
            elif now - since > self._dead_after_s:
                return node, f"no heartbeat for {now - since:.0f}s"
            if node not in self._ready and self._store.check([_key("ready", node)]):
                self._ready.add(node)
                if len(self._ready) == len(self._nodes):
                    self._all_ready.set()
        return None
