"""The draft service's warm-up runs on the engine thread: the event loop (its health service) keeps answering."""
import asyncio
import threading
import time
from concurrent.futures import Future

from draft_service.main import warm_up


class SlowDrafter:
    """Answers its one proposal from another thread after `seconds`, as the engine thread would."""
    def __init__(self, seconds: float):
        self.seconds = seconds

    def submit(self, *args) -> Future:
        fut: Future = Future()
        threading.Timer(self.seconds, lambda: fut.set_result("drafted")).start()
        return fut


def test_warm_up_leaves_the_event_loop_free():
    async def main():
        ticks = 0

        async def tick():
            nonlocal ticks
            while True:
                ticks += 1
                await asyncio.sleep(0.01)
        ticker = asyncio.create_task(tick())
        t = time.perf_counter()
        await warm_up(SlowDrafter(0.3))
        elapsed = time.perf_counter() - t
        ticker.cancel()
        return ticks, elapsed
    ticks, elapsed = asyncio.run(main())
    assert elapsed >= 0.3
    assert ticks >= 10, f"the loop ran {ticks} times during a {elapsed:.2f}s warm-up: it was blocked"
