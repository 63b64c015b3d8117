"""The shared engine thread without a model: batching, the queue bound, cancelled callers, failing batches,
deferred keys, control calls, the periodic hook and shutdown. Every test runs in milliseconds."""
import threading
import time

import pytest

from common.engine.batch_worker import BatchWorker, Job
from common.errors import EngineStoppedError, QueueFullError


class HeldStep:
    """A batch step that records its batches and can hold the engine thread inside one (deterministic batches)."""

    def __init__(self, fail_on=None):
        self.batches: list[list] = []
        self.entered, self.gate = threading.Event(), threading.Event()
        self.gate.set()
        self.fail_on = fail_on

    def hold(self):
        self.gate.clear()

    def __call__(self, jobs: list[Job]) -> int:
        self.batches.append([j.item for j in jobs])
        self.entered.set()
        assert self.gate.wait(5)
        if self.fail_on is not None and self.fail_on in self.batches[-1]:
            raise RuntimeError(f"item {self.fail_on} blew up")
        for j in jobs:
            j.future.set_result(j.item * 10)
        return len(jobs)


def _worker(step, **kw):
    kw = {"name": "test", "max_batch": 8, "max_queue": 16, **kw}
    return BatchWorker(step, **kw)


def _hold_on_first(w, step):
    """Submit item 0 and hold the engine thread inside its batch; returns its future."""
    step.hold()
    first = w.submit(0)
    assert step.entered.wait(5)
    return first


def test_queued_items_are_taken_together_up_to_max_batch():
    step = HeldStep()
    w = _worker(step, max_batch=3)
    try:
        first = _hold_on_first(w, step)
        futs = [w.submit(i) for i in range(1, 6)]
        assert w.queue_depth == 5
        step.gate.set()
        assert first.result(5) == 0 and [f.result(5) for f in futs] == [10, 20, 30, 40, 50]
    finally:
        w.shutdown()
    assert step.batches == [[0], [1, 2, 3], [4, 5]]
    assert list(w.batch_sizes) == [1, 3, 2] and w.queue_depth == 0


def test_a_full_queue_is_refused_at_once():
    step = HeldStep()
    w = _worker(step, max_queue=2)
    try:
        _hold_on_first(w, step)
        w.submit(1), w.submit(2)
        t = time.perf_counter()
        with pytest.raises(QueueFullError, match=r"test queue full \(2 calls waiting\)"):
            w.submit(3)
        assert time.perf_counter() - t < 0.1                  # refused, never waited on
    finally:
        step.gate.set()
        w.shutdown()


def test_a_cancelled_future_is_skipped_and_the_thread_goes_on():
    step = HeldStep()
    w = _worker(step)
    try:
        first = _hold_on_first(w, step)
        gone, kept = w.submit(1), w.submit(2)
        assert gone.cancel()                                  # what grpc does when the RPC is cancelled
        step.gate.set()
        assert first.result(5) == 0 and kept.result(5) == 20
        assert w.submit(3).result(5) == 30
    finally:
        w.shutdown()
    assert all(1 not in b for b in step.batches)


def test_a_failing_batch_fails_only_its_own_futures():
    step = HeldStep(fail_on=2)
    w = _worker(step)
    try:
        first = _hold_on_first(w, step)
        a, b = w.submit(1), w.submit(2)
        step.gate.set()
        assert first.result(5) == 0
        for f in (a, b):
            with pytest.raises(RuntimeError, match="item 2 blew up"):
                f.result(5)
        assert w.submit(3).result(5) == 30                     # the thread survived
    finally:
        w.shutdown()
    assert list(w.batch_sizes) == [1, 1]                       # the failed batch is not counted


def test_a_step_may_set_some_futures_itself_before_failing():
    def step(jobs):
        jobs[0].future.set_result("answered")
        raise ValueError("the rest failed")
    w = _worker(step)
    try:
        f = w.submit(1)
        assert f.result(5) == "answered"
    finally:
        w.shutdown()


def test_items_sharing_a_batch_key_wait_for_the_next_batch():
    step = HeldStep()
    w = _worker(step, batch_key=lambda item: item % 2 if item < 100 else None)
    try:
        first = _hold_on_first(w, step)
        futs = [w.submit(i) for i in (1, 3, 5, 100, 101)]     # 1, 3, 5 share a key; 100+ have none
        step.gate.set()
        first.result(5), [f.result(5) for f in futs]
    finally:
        w.shutdown()
    assert step.batches == [[0], [1, 100, 101], [3], [5]]


def test_control_calls_run_between_batches_even_when_the_queue_is_full():
    step = HeldStep()
    w = _worker(step, max_queue=1)
    try:
        _hold_on_first(w, step)
        w.submit(1)                                            # the queue is now full
        ran_on = []
        ctl = w.control(lambda: ran_on.append(threading.current_thread().name) or "released")
        failing = w.control(lambda: 1 / 0)
        step.gate.set()
        assert ctl.result(5) == "released" and ran_on == ["specd-test"]
        with pytest.raises(ZeroDivisionError):
            failing.result(5)
        assert w.submit(2).result(5) == 20
    finally:
        w.shutdown()


def test_the_periodic_hook_runs_after_each_iteration_and_when_idle():
    ticks = []
    w = _worker(HeldStep(), on_tick=lambda: ticks.append(time.monotonic()), tick_s=0.01)
    try:
        deadline = time.monotonic() + 5
        while len(ticks) < 3 and time.monotonic() < deadline:  # no traffic at all
            time.sleep(0.005)
        assert len(ticks) >= 3
        n = len(ticks)
        w.submit(1).result(5)
        time.sleep(0.05)
        assert len(ticks) > n
    finally:
        w.shutdown()


def test_a_failing_hook_does_not_stop_the_thread():
    def hook():
        raise RuntimeError("hook blew up")
    w = _worker(HeldStep(), on_tick=hook, tick_s=0.01)
    try:
        time.sleep(0.03)
        assert w.submit(4).result(5) == 40
    finally:
        w.shutdown()


def test_shutdown_finishes_the_batch_fails_the_rest_and_joins():
    step = HeldStep()
    w = _worker(step)
    first = _hold_on_first(w, step)
    queued = w.submit(1)
    stopper = threading.Thread(target=w.shutdown)
    stopper.start()
    time.sleep(0.02)
    step.gate.set()
    stopper.join(5)
    assert not stopper.is_alive() and not w._thread.is_alive()
    assert first.result(5) == 0
    with pytest.raises(EngineStoppedError, match="shut down before this call ran"):
        queued.result(5)
    with pytest.raises(EngineStoppedError):
        w.submit(2)
    with pytest.raises(EngineStoppedError):
        w.control(lambda: None)


@pytest.mark.parametrize("kw,match", [(dict(max_batch=0), "max_batch=0"), (dict(max_queue=0), "max_queue=0"),
                                      (dict(tick_s=0), "tick_s=0")])
def test_bad_settings_are_refused(kw, match):
    with pytest.raises(ValueError, match=match):
        _worker(HeldStep(), **kw)
