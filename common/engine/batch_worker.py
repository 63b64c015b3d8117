"""One engine thread that takes every queued item (up to `max_batch`) and hands them to a service's batch step.

Shared by the draft service and the verifier: a bounded queue refused at once when full, futures that a caller
who went away (cancelled) cannot break, one batch's failure confined to its own futures, control calls that run
on the engine thread between batches without waiting behind the queue, and a periodic hook. No torch, no gRPC.
"""
from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable, Hashable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from common.errors import EngineStoppedError, QueueFullError

log = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(slots=True)
class Job(Generic[T]):
    """A queued item and the future its caller awaits (the batch step sets it)."""
    item: T
    future: Future


# Runs one batch on the engine thread and sets each job's future; returns how many jobs shared its pass
# (recorded in `batch_sizes` when > 0). An exception fails every future of the batch not yet set.
BatchStep = Callable[[list[Job]], int]


class BatchWorker(Generic[T]):
    def __init__(self, step: BatchStep, *, name: str, max_batch: int, max_queue: int,
                 batch_key: Callable[[T], Hashable | None] | None = None,
                 on_tick: Callable[[], None] | None = None, tick_s: float | None = None):
        """`batch_key`: items with the same non-None key never share a batch (the later waits for the next).
        `on_tick`: runs on the engine thread after every loop iteration, and at least every `tick_s` when idle."""
        if max_batch < 1 or max_queue < 1:
            raise ValueError(f"max_batch={max_batch}, max_queue={max_queue}: both must be >= 1")
        if tick_s is not None and not tick_s > 0:
            raise ValueError(f"tick_s={tick_s}: must be > 0")
        self.name = name
        self.max_batch = max_batch
        self.max_queue = max_queue
        self._step = step
        self._batch_key = batch_key
        self._on_tick = on_tick
        self._tick_s = tick_s
        self._cv = threading.Condition()
        self._queue: deque[Job] = deque()                       # bounded by max_queue in submit
        self._controls: deque[tuple[Callable[[], Any], Future]] = deque()
        self._deferred: list[Job] = []                          # same batch key twice: next batch
        self._stopping = False
        self.batch_sizes: deque[int] = deque(maxlen=4096)       # the latest batches (tests read it)
        self._thread = threading.Thread(target=self._loop, name=f"specd-{name}", daemon=True)
        self._thread.start()

    # ---- any thread ---------------------------------------------------------------------------------------
    def submit(self, item: T) -> Future:
        """Queue one item; never waits: a full queue raises QueueFullError at once."""
        fut: Future = Future()
        with self._cv:
            if self._stopping:
                raise EngineStoppedError(f"{self.name} engine is shutting down; retry on another replica")
            if len(self._queue) >= self.max_queue:
                raise QueueFullError(f"{self.name} queue full ({self.max_queue} calls waiting); retry later")
            self._queue.append(Job(item, fut))
            self._cv.notify()
        return fut

    def control(self, fn: Callable[[], Any]) -> Future:
        """Run `fn()` on the engine thread before the next batch (not behind the queue, never refused as full)."""
        fut: Future = Future()
        with self._cv:
            if self._stopping:
                raise EngineStoppedError(f"{self.name} engine is shutting down")
            self._controls.append((fn, fut))
            self._cv.notify()
        return fut

    @property
    def queue_depth(self) -> int:
        return len(self._queue)

    def shutdown(self, timeout: float = 30) -> None:
        """Finish the batch in progress, fail what is still queued (EngineStoppedError), join the thread."""
        with self._cv:
            self._stopping = True
            self._cv.notify()
        self._thread.join(timeout=timeout)

    # ---- engine thread ------------------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._cv:
                if not (self._queue or self._controls or self._deferred or self._stopping):
                    self._cv.wait(self._tick_s)
                controls, self._controls = self._controls, deque()
                stopping = self._stopping
                batch = [] if stopping else self._take()
            for fn, fut in controls:
                self._run_control(fn, fut)
            if stopping:
                self._fail_pending()
                return
            if batch:
                self._run(batch)
            if self._on_tick is not None:
                try:
                    self._on_tick()
                except Exception:  # noqa: BLE001 - the engine thread must outlive its hook
                    log.exception("%s: periodic hook failed", self.name)

    def _take(self) -> list[Job]:
        """The deferred jobs, topped up from the queue to max_batch; cancelled ones dropped (under the lock)."""
        batch, self._deferred = self._deferred, []
        while self._queue and len(batch) < self.max_batch:
            batch.append(self._queue.popleft())
        batch = [j for j in batch if not j.future.cancelled()]
        if self._batch_key is None:
            return batch
        runnable, seen = [], set()
        for job in batch:
            key = self._batch_key(job.item)
            if key is not None and key in seen:
                self._deferred.append(job)
            else:
                seen.add(key)
                runnable.append(job)
        return runnable

    def _run(self, batch: list[Job]) -> None:
        # A caller that went away (cancelled, past its deadline) cancelled its future: skip its work, and never
        # set a result on a cancelled future (InvalidStateError would end this thread). Once running, the
        # future can no longer be cancelled.
        batch = [j for j in batch if j.future.set_running_or_notify_cancel()]
        if not batch:
            return
        try:
            served = self._step(batch)
        except Exception as e:  # noqa: BLE001 - handed to every caller of the batch; the thread goes on
            log.warning("%s batch of %d failed: %s", self.name, len(batch), e)
            for job in batch:
                if not job.future.done():
                    job.future.set_exception(e)
            return
        if served:
            self.batch_sizes.append(served)

    @staticmethod
    def _run_control(fn: Callable[[], Any], fut: Future) -> None:
        if not fut.set_running_or_notify_cancel():
            return
        try:
            fut.set_result(fn())
        except Exception as e:  # noqa: BLE001 - the caller gets it; the thread goes on
            fut.set_exception(e)

    def _fail_pending(self) -> None:
        with self._cv:
            pending, self._queue, self._deferred = [*self._deferred, *self._queue], deque(), []
            controls, self._controls = self._controls, deque()
        err = EngineStoppedError(f"{self.name} engine shut down before this call ran")
        for job in pending:
            if job.future.set_running_or_notify_cancel():
                job.future.set_exception(err)
        for _, fut in controls:
            if fut.set_running_or_notify_cancel():
                fut.set_exception(err)


class BatchedEngine:
    """What an engine built on a BatchWorker (`self._worker`) shows of it: its bound and its load."""
    _worker: BatchWorker

    @property
    def max_batch(self) -> int:
        return self._worker.max_batch

    @property
    def queue_depth(self) -> int:
        return self._worker.queue_depth

    @property
    def batch_sizes(self) -> deque[int]:
        """The sizes of the latest batches (tests read it)."""
        return self._worker.batch_sizes
