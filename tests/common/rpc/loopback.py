"""A grpc.aio server on its own event-loop thread, so a test can call it with blocking clients (SpecdClient,
`specd health`) from the main thread."""
from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable

import grpc


class BackgroundServer:
    """`with BackgroundServer(build) as s:` where `async build() -> (server, port)` makes and starts the server
    on the background loop; `s.target` is 127.0.0.1:port. Servers appended to `s.also_stop` stop with it."""

    def __init__(self, build: Callable[[], Awaitable[tuple[grpc.aio.Server, int]]]):
        self._build = build
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.server: grpc.aio.Server | None = None
        self.port = 0
        self.also_stop: list[grpc.aio.Server] = []

    def call(self, coro, timeout: float = 10.0):
        """Run a coroutine on the server's loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def __enter__(self):
        self._thread.start()
        self.server, self.port = self.call(self._build())
        return self

    def __exit__(self, *exc):
        for server in [self.server, *self.also_stop]:
            if server is not None:
                self.call(server.stop(0))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=10)
        self.loop.close()
