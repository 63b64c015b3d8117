"""The test run's peak memory: the pytest process and every process it started, summed, sampled twice a second
(pages that processes share count once per process: an upper bound).

The budget is 14 GiB on a 24 GiB machine (CI's); the summary line names the peak and the test running at it.
"""
from __future__ import annotations

import ctypes
import gc
import threading

import psutil


class MemoryWatch:
    def __init__(self, interval_s: float = 0.5):
        self.interval_s = interval_s
        self.peak_bytes = 0
        self.peak_own_bytes = 0                 # of which the pytest process itself, at that moment
        self.peak_test = ""
        self.current_test = ""
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="memory-watch", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        me = psutil.Process()
        while True:
            total = own = me.memory_info().rss
            for p in me.children(recursive=True):
                try:
                    total += p.memory_info().rss
                except psutil.Error:            # exited between listing and reading
                    pass
            if total > self.peak_bytes:
                self.peak_bytes, self.peak_own_bytes, self.peak_test = total, own, self.current_test
            if self._stop.wait(self.interval_s):
                return


def release_memory() -> None:
    """Collect garbage and hand freed heap pages back to the OS (glibc keeps them otherwise), so a test that freed
    a model set does not sit beside it while the next one loads."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):       # not glibc
        pass
