"""Notice at once when a peer process of a tensor-parallel group dies: rank 0 watches its spawned ranks, and a
spawned rank watches rank 0. A collective with a dead peer can block or fail long after the loss; the process
sentinels say it the moment the kernel reaps the peer. No torch, no gRPC."""
from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from multiprocessing.connection import wait

from common.errors import EngineStoppedError

log = logging.getLogger(__name__)

# Called once, on the watch thread, with the lost rank and its exit code (negative: killed by that signal).
OnLoss = Callable[[int, "int | None"], None]


class TPRankLostError(EngineStoppedError):
    """A tensor-parallel rank died: the group cannot compute any more, and the process must be restarted
    (UNAVAILABLE: the call did not run here; retry on another replica)."""
    reason = "TP_RANK_LOST"


class RankWatch:
    """One daemon thread waiting on the sentinels of peer processes; the first one that ends is reported once.

    `exit_code(rank)` reads a peer's exit code (None when unknown, e.g. the parent process)."""

    def __init__(self, sentinels: dict[int, int], on_loss: OnLoss,
                 exit_code: Callable[[int], int | None] = lambda rank: None, name: str = "specd-rank-watch"):
        if not sentinels:
            raise ValueError("RankWatch: no process to watch")
        self._sentinels = dict(sentinels)            # rank -> a handle that becomes ready when that process ends
        self._on_loss = on_loss
        self._exit_code = exit_code
        self._lost = threading.Event()
        self._stopped = threading.Event()
        self.lost_rank: int | None = None
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    @classmethod
    def of_processes(cls, processes: dict, on_loss: OnLoss, **kw) -> "RankWatch":
        """Watch multiprocessing.Process objects by rank, reporting their exit codes."""
        def exit_code(rank: int) -> int | None:
            processes[rank].join(timeout=1.0)       # the sentinel can fire just before the process is reaped
            return processes[rank].exitcode
        return cls({rank: p.sentinel for rank, p in processes.items()}, on_loss, exit_code, **kw)

    @property
    def lost(self) -> bool:
        return self._lost.is_set()

    def wait_lost(self, timeout_s: float) -> bool:
        """True once a peer is known lost; waits at most `timeout_s` for the sentinel to say so."""
        return self._lost.wait(timeout_s)

    def stop(self) -> None:
        """Stop watching (an orderly shutdown is about to end the peers): nothing is reported after this."""
        self._stopped.set()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=5)

    def _loop(self) -> None:
        by_handle = {handle: rank for rank, handle in self._sentinels.items()}
        while not self._stopped.is_set():
            # A short timeout only bounds how long stop() waits; a death wakes the wait at once.
            ready = wait(list(by_handle), timeout=0.2)
            if not ready or self._stopped.is_set():
                continue
            rank = min(by_handle[h] for h in ready)
            self.lost_rank = rank
            self._lost.set()
            code = self._exit_code(rank)
            log.error("tensor-parallel rank %d exited (exit code %s): the group is broken", rank, code)
            try:
                self._on_loss(rank, code)
            except Exception:  # noqa: BLE001 - the report is all this thread is for; say why it failed
                log.exception("rank-loss handler failed")
            return
