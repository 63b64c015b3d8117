"""Drives a ModelRunner on every rank of a tensor-parallel group.

Rank 0 lives in the caller's process; the other ranks of its node are spawned processes that loop on "the next
call", broadcast by rank 0. Ranks on other nodes (a TPLayout of several nodes) are spawned there by a WorkerNode
(common/engine/worker_node.py) and watched through the rendezvous store (common/engine/node_watch.py). Each call
runs on every rank in the same order, so all ranks keep identical block tables; only the method name and its
(small) arguments cross the process boundary, never tensors.
A RankWatch on each side turns the death of a peer into one report (`on_rank_loss`) and fails every later call
with TPRankLostError, instead of leaving rank 0 to a collective that may never return.
"""
from __future__ import annotations

import atexit
import logging
import multiprocessing as mp
import os
import queue
import signal
import threading
import time
import traceback
from collections.abc import Callable

from common.config import EngineConfig
from common.distributed import COLLECTIVE_TIMEOUT_S, free_port, init_tp_group
from common.engine.forward_io import ForwardOutput, SequenceChunk
from common.engine.model_runner import ModelRunner
from common.engine.node_watch import DEAD_AFTER_S, NodeWatch, connect_store, publish_terms
from common.engine.rank_watch import RankWatch, TPRankLostError
from common.engine.tp_layout import TPLayout, group_terms
from common.errors import SpecdError

log = logging.getLogger(__name__)

# Calls a worker rank replays; anything else is refused on rank 0 before it is broadcast.
_REPLAYED = ("forward", "truncate", "free")
_SHUTDOWN = "__shutdown__"
_KEEPALIVE = "__keepalive__"
# An idle worker waits for the next call inside a collective, which fails after the group's timeout: rank 0 sends
# a no-op when it has sent nothing for this long, so an idle verifier keeps its ranks.
KEEPALIVE_S = 60.0
# A collective that fails while a peer is dying: how long to wait for its sentinel to tell a loss from a bug.
_LOSS_CONFIRM_S = 1.0


def cpu_threads_per_rank(ranks_on_this_node: int) -> int:
    """Split this process's cores (its CPU affinity: a container's cpuset, a taskset) between the CPU ranks on
    this node: oversubscribed OpenMP pools stall every parallel region for milliseconds (a 2-core host with 2
    ranks × 2 threads ran a 16-element softmax in 7 ms instead of 3 µs)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // ranks_on_this_node)


def worker_main(rank: int, config: EngineConfig, init_method: str, ready, timeout_s: float, local_rank: int,
                ranks_on_this_node: int) -> None:
    """A spawned rank's process: load its shards, then replay rank 0's calls until shutdown."""
    # A SIGTERM/SIGINT to the process group is rank 0's to handle: it drains, then ends the workers with a
    # shutdown call (a worker dying first would fail the calls still in flight). Rank 0 gone (killed, crashed)
    # means no more calls: end now rather than wait in a collective.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)
    RankWatch({0: mp.parent_process().sentinel}, lambda *_: os._exit(1), name=f"specd-tp-rank{rank}-watch")
    if config.device == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        import torch
        torch.set_num_threads(cpu_threads_per_rank(ranks_on_this_node))
    try:
        tp = init_tp_group(rank, config.tp_size, init_method, config.device, timeout_s, local_rank)
        runner = ModelRunner(config, tp)
    except BaseException as e:  # report load failures to rank 0 instead of hanging it
        ready.put((rank, f"{type(e).__name__}: {e}"))
        raise
    ready.put((rank, None))
    while True:
        method, args = tp.broadcast_object(None)
        if method == _KEEPALIVE:
            continue
        if method == _SHUTDOWN:
            runner.close()
            break
        try:
            getattr(runner, method)(*args)
        except (SpecdError, ValueError, KeyError):
            pass  # rank 0 raised the same error from the same state and reports it to its caller
        except Exception:
            traceback.print_exc()
            os._exit(1)


def _kill(workers: list[mp.Process]) -> None:
    # SIGKILL: the workers ignore SIGTERM, so multiprocessing's own exit handler (terminate, then join without a
    # timeout) would wait for them forever.
    for p in workers:
        if p.is_alive():
            p.kill()


class TPExecutor:
    """The engine's handle on its model: `forward`, `truncate`, `free` run on all TP ranks.

    `on_rank_loss(err)` is called once, from a watch thread, when a spawned rank dies or a worker node is lost; by
    then every later call raises a TPRankLostError like it, and the surviving local ranks are killed. The caller
    decides what the process does next (the verifier reports NOT_SERVING and exits).

    `layout` places the ranks on nodes (default: all `tp_size` on this one); this process is always the driver,
    global rank 0 on node 0."""

    def __init__(self, config: EngineConfig, init_method: str | None = None, *, layout: TPLayout | None = None,
                 on_rank_loss: Callable[[TPRankLostError], None] | None = None,
                 collective_timeout_s: float = COLLECTIVE_TIMEOUT_S, keepalive_s: float = KEEPALIVE_S):
        if not 0 < keepalive_s < collective_timeout_s:
            raise ValueError(f"keepalive_s={keepalive_s}: must be in (0, collective_timeout_s="
                             f"{collective_timeout_s})")
        layout = layout or TPLayout(world_size=config.tp_size)
        if layout.world_size != config.tp_size or not layout.is_driver_node:
            raise ValueError(f"TPExecutor drives node 0 of a {config.tp_size}-rank group; got {layout}")
        self.config = config
        self.layout = layout
        self._workers: list[mp.Process] = []
        self._loss: str | None = None          # what a lost rank's TPRankLostError says (set by the watch)
        self._on_rank_loss = on_rank_loss
        self._lock = threading.Lock()          # one broadcast at a time: the engine's calls and the keep-alive
        self._last_sent = time.monotonic()
        self._closing = threading.Event()
        self._watch: RankWatch | None = None
        self._node_watch: NodeWatch | None = None
        if config.tp_size == 1:
            self.runner = ModelRunner(config)
            return
        init_method = init_method or (layout.init_method if layout.multi_node else
                                      f"tcp://127.0.0.1:{free_port()}")
        local = layout.nproc_per_node
        if config.device == "cpu" and "OMP_NUM_THREADS" not in os.environ:
            import torch
            torch.set_num_threads(cpu_threads_per_rank(local))
        ctx = mp.get_context("spawn")
        ready = ctx.Queue()
        for rank in range(1, local):
            p = ctx.Process(target=worker_main, daemon=True, name=f"specd-tp-rank{rank}",
                            args=(rank, config, init_method, ready, collective_timeout_s, rank, local))
            p.start()
            self._workers.append(p)
        atexit.register(_kill, self._workers)       # a process that exits without shutdown() (LIFO: before mp's)
        if self._workers:
            self._watch = RankWatch.of_processes(dict(enumerate(self._workers, 1)), self._rank_lost)
        try:
            # On several nodes this waits for every node's ranks to join the store it hosts (any start order).
            self.tp = init_tp_group(0, config.tp_size, init_method, config.device, collective_timeout_s, 0)
            if layout.multi_node:
                store = connect_store(layout, collective_timeout_s)
                publish_terms(store, group_terms(config))
                self._node_watch = NodeWatch(store, layout, self._node_lost)
            self.runner = ModelRunner(config, self.tp)
            self._wait_ready(ready, len(self._workers))
        except BaseException:
            self._stop_watches()
            self._kill_workers()
            raise
        threading.Thread(target=self._keep_alive, args=(keepalive_s,), name="specd-tp-keepalive",
                         daemon=True).start()
        log.info("tensor parallel group up: %d ranks (%s)", config.tp_size, init_method)

    def _wait_ready(self, ready, n: int, timeout_s: float = 600) -> None:
        deadline = time.monotonic() + timeout_s
        while n:
            if self.lost:
                raise RuntimeError(f"TP group failed to start: {self._lost_error()}")
            try:
                rank, err = ready.get(timeout=min(0.5, max(deadline - time.monotonic(), 0.01)))
            except queue.Empty:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"TP ranks not loaded after {timeout_s:.0f}s") from None
                continue
            if err:
                raise RuntimeError(f"TP rank {rank} failed to start: {err}")
            n -= 1
        if self._node_watch is not None and not self._node_watch.wait_ready(max(deadline - time.monotonic(), 0)):
            raise RuntimeError(f"TP group failed to start: {self._lost_error()}" if self.lost else
                               f"worker nodes not loaded after {timeout_s:.0f}s")

    # ---- the replayed calls -------------------------------------------------------------------------------
    def forward(self, chunks: list[SequenceChunk]) -> ForwardOutput:
        return self._call("forward", chunks)

    def truncate(self, seq_id: int, new_len: int) -> None:
        self._call("truncate", seq_id, new_len)

    def free(self, seq_id: int) -> None:
        self._call("free", seq_id)

    def _call(self, method: str, *args):
        assert method in _REPLAYED
        if self.config.tp_size == 1:
            return getattr(self.runner, method)(*args)
        self._raise_if_lost()
        with self._lock:
            self._raise_if_lost()
            try:
                self._broadcast((method, args))
                return getattr(self.runner, method)(*args)
            except (SpecdError, ValueError, KeyError):
                raise      # raised from the shared state on every rank: the group is fine
            except Exception as e:
                # A collective that failed because a peer is dying (gloo: "Connection closed by peer"): say so.
                # A remote node's loss shows in its heartbeat within node_watch.DEAD_AFTER_S at most.
                if self._wait_lost(_LOSS_CONFIRM_S if self._node_watch is None else DEAD_AFTER_S + 1):
                    raise self._lost_error() from e
                raise

    @property
    def lost(self) -> bool:
        """True once a rank died: nothing can be computed any more."""
        return any(w.lost for w in self._watches())

    def _watches(self) -> list:
        return [w for w in (self._watch, self._node_watch) if w is not None]

    def _wait_lost(self, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while not self.lost and time.monotonic() < deadline:
            time.sleep(0.05)
        return self.lost

    def _stop_watches(self) -> None:
        for w in self._watches():
            w.stop()

    def _raise_if_lost(self) -> None:
        if self.lost:
            raise self._lost_error()

    def _lost_error(self) -> TPRankLostError:
        # A fresh error per caller (tracebacks never pile up); the exit code once the watch has read it.
        rank = next((w.lost_rank for w in self._watches() if w.lost), None)
        return TPRankLostError(self._loss or self._loss_message(rank, "unknown"))

    def _loss_message(self, rank, exit_code) -> str:
        return (f"tensor-parallel rank {rank} of {self.config.tp_size} exited (exit code {exit_code}): the group "
                "cannot compute any more and its process must be restarted")

    def _broadcast(self, message) -> None:
        self.tp.broadcast_object(message)
        self._last_sent = time.monotonic()

    def _rank_lost(self, rank: int, exit_code: int | None) -> None:
        self._lose(self._loss_message(rank, exit_code))

    def _node_lost(self, rank: int, reason: str) -> None:
        self._lose(f"tensor-parallel {reason}: the group cannot compute any more and its process must be restarted")

    def _lose(self, message: str) -> None:
        """From a watch thread, once: every later call fails with `message`."""
        self._loss = message
        # The survivors wait in a collective that cannot complete; ending them also fails rank 0's at once.
        _kill(self._workers)
        if self._on_rank_loss is not None:
            self._on_rank_loss(self._lost_error())

    def _keep_alive(self, period_s: float) -> None:
        while not self._closing.wait(min(period_s / 4, 5.0)):
            if self.lost:
                return
            if time.monotonic() - self._last_sent < period_s or not self._lock.acquire(blocking=False):
                continue                                    # a call in progress keeps the ranks busy anyway
            try:
                if not self.lost and not self._closing.is_set():
                    self._broadcast((_KEEPALIVE, ()))
            except Exception as e:  # noqa: BLE001 - a dying peer; the watch reports it
                log.warning("keep-alive broadcast failed: %s", e)
            finally:
                self._lock.release()

    # ---- local queries (identical on every rank, so rank 0 answers) ----------------------------------------
    @property
    def model_config(self):
        return self.runner.model_config

    def num_tokens(self, seq_id: int) -> int:
        return self.runner.num_tokens(seq_id)

    @property
    def allocator(self):
        return self.runner.allocator

    def shutdown(self) -> None:
        self._closing.set()
        self.runner.close()
        if self.config.tp_size > 1:
            self._stop_watches()                    # the workers are about to exit on purpose
            if not self.lost:
                try:
                    with self._lock:
                        self.tp.broadcast_object((_SHUTDOWN, ()))
                except Exception:  # a dead worker: fall through to terminate
                    pass
                for p in self._workers:
                    p.join(timeout=30)
            self._kill_workers()
            import torch.distributed as dist
            if dist.is_initialized():
                dist.destroy_process_group()

    def _kill_workers(self) -> None:
        _kill(self._workers)
        for p in self._workers:
            p.join(timeout=10)
        self._workers.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.shutdown()
