"""Cross-node liveness through a real c10d TCPStore on loopback: a silent node is lost after the deadline, a node
that says why it ends is lost at once with its reason, readiness is seen, and a worker whose store goes away
reports the driver lost."""
import contextlib
import threading
import time
from datetime import timedelta

import pytest
import torch.distributed as dist

from common.distributed import free_port
from common.engine import node_watch
from common.engine.node_watch import Heartbeat, NodeWatch, connect_store
from common.engine.tp_layout import TPLayout


@pytest.fixture()
def layout():
    port = free_port()
    master = dist.TCPStore("127.0.0.1", port, is_master=True, timeout=timedelta(seconds=10))
    yield TPLayout(world_size=3, nnodes=3, rdzv_endpoint=f"127.0.0.1:{port}")
    del master


@contextlib.contextmanager
def _beating(layout, on_loss, dead_after_s):
    """Worker nodes 1 and 2 beating, and the driver's watch on them; all stopped afterwards."""
    beats = [Heartbeat(connect_store(layout, 5), node, lambda r: None) for node in (1, 2)]
    watch = NodeWatch(connect_store(layout, 5), layout, on_loss, dead_after_s=dead_after_s)
    try:
        yield beats, watch
    finally:
        watch.stop()
        for b in beats:
            b.stop()


def _losses():
    got, event = [], threading.Event()

    def on_loss(*args):
        got.append(args)
        event.set()
    return got, event, on_loss


def test_beating_nodes_stay_alive_and_a_silent_one_is_lost(layout, monkeypatch):
    monkeypatch.setattr(node_watch, "HEARTBEAT_S", 0.05)
    got, event, on_loss = _losses()
    with _beating(layout, on_loss, dead_after_s=0.5) as (beats, watch):
        assert not event.wait(1.0)                      # both beat: nothing lost
        beats[1].stop()                                 # node 2 falls silent
        assert event.wait(3.0)
        [(rank, reason)] = got
        assert rank == 2 and "node 2 of 3 (tensor-parallel ranks 2-2) lost: no heartbeat for" in reason
        assert watch.lost and watch.lost_rank == 2


def test_a_reported_loss_is_seen_at_once_with_its_reason(layout, monkeypatch):
    monkeypatch.setattr(node_watch, "HEARTBEAT_S", 0.05)
    got, event, on_loss = _losses()
    with _beating(layout, on_loss, dead_after_s=30) as (beats, watch):
        t = time.monotonic()
        beats[0].report_lost("rank 1 exited (exit code -9)")
        assert event.wait(2.0) and time.monotonic() - t < 1.0
        assert got == [(1, "node 1 of 3 (tensor-parallel ranks 1-1) lost: rank 1 exited (exit code -9)")]


def test_ready_once_every_worker_node_said_so(layout, monkeypatch):
    monkeypatch.setattr(node_watch, "HEARTBEAT_S", 0.05)
    with _beating(layout, lambda *a: None, dead_after_s=30) as (beats, watch):
        beats[0].ready()
        assert not watch.wait_ready(0.5)
        beats[1].ready()
        assert watch.wait_ready(2.0)


def test_a_worker_whose_store_goes_away_reports_the_driver_lost(monkeypatch):
    monkeypatch.setattr(node_watch, "HEARTBEAT_S", 0.05)
    port = free_port()
    master = dist.TCPStore("127.0.0.1", port, is_master=True, timeout=timedelta(seconds=10))
    layout = TPLayout(world_size=2, nnodes=2, rdzv_endpoint=f"127.0.0.1:{port}")
    got, event, on_loss = _losses()
    beat = Heartbeat(connect_store(layout, 5), 1, on_loss)
    time.sleep(0.3)
    del master                                          # the driver's process (and its store) is gone
    assert event.wait(15.0)
    [(reason,)] = got
    assert "the driver's rendezvous store stopped answering" in reason
    beat.stop()
