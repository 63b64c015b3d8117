"""A user-space TCP delay proxy: a WAN between the gateway and a service, emulated on one machine.

Each route listens on a local port and forwards every byte, unchanged and in order, to its upstream, holding each
chunk for the one-way delay (plus optional uniform jitter) in both directions, so a request/reply pair sees
RTT ≈ 2 × delay. Kernel netem would do this below TCP; it is not available on these machines, so the delay applies
to the byte stream: a chunk leaves no earlier than `delay` after it arrived and never before the chunk ahead of it
(jitter never reorders bytes). The delay can be changed while connections are open (`set_delay`): a benchmark
interleaves delays over the same long-lived gRPC channels.

Runs in threads of the caller's process (`DelayProxy.start()`), or as a process of its own:
    python -m bench.delay_proxy --route 127.0.0.1:6001=127.0.0.1:50052 --delay-ms 10
"""
from __future__ import annotations

import argparse
import random
import signal
import socket
import threading
import time
from collections import deque
from dataclasses import dataclass

CHUNK = 1 << 16


@dataclass(slots=True)
class Route:
    listen_port: int            # 0: any free port (read `port` after start)
    upstream_host: str
    upstream_port: int
    port: int = 0               # the port it listens on, once started


class DelayProxy:
    def __init__(self, routes: list[Route], delay_s: float = 0.0, jitter_s: float = 0.0, host: str = "127.0.0.1",
                 seed: int | None = None):
        self.routes = routes
        self.host = host
        self.set_delay(delay_s, jitter_s)
        self._random = random.Random(seed)
        self._listeners: list[socket.socket] = []
        self._sockets: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self.bytes_forwarded = 0

    def set_delay(self, delay_s: float, jitter_s: float = 0.0) -> None:
        """One-way delay (and jitter bound) applied to chunks that arrive from now on; safe from any thread."""
        if delay_s < 0 or jitter_s < 0:
            raise ValueError(f"delay_s={delay_s}, jitter_s={jitter_s}: must be >= 0")
        self.delay_s, self.jitter_s = delay_s, jitter_s

    # ---- lifecycle ----------------------------------------------------------------------------------------
    def start(self) -> DelayProxy:
        """Listen on every route (each accepts in a thread of its own); returns once all ports are bound."""
        for route in self.routes:
            listener = socket.create_server((self.host, route.listen_port))
            route.port = listener.getsockname()[1]
            self._listeners.append(listener)
            _thread(self._accept_loop, route, listener, name=f"delay-proxy-{route.port}")
        return self

    def stop(self) -> None:
        self._closed.set()
        with self._lock:
            for s in [*self._listeners, *self._sockets]:
                _close(s)
            self._sockets.clear()

    def __enter__(self) -> DelayProxy:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ---- forwarding ---------------------------------------------------------------------------------------
    # Threads, not an event loop: a sleeping thread wakes within ~0.1 ms of its due time, where asyncio's timers
    # (millisecond epoll timeouts) overshot a 12.5 ms delay by ~2 ms, 15% of the RTT measured.
    def _accept_loop(self, route: Route, listener: socket.socket) -> None:
        while not self._closed.is_set():
            try:
                client, _ = listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection((route.upstream_host, route.upstream_port), timeout=10)
                upstream.settimeout(None)
            except OSError:
                _close(client)
                continue
            for s in (client, upstream):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                self._sockets |= {client, upstream}
            _thread(self._pipe, client, upstream, name="delay-proxy-up")
            _thread(self._pipe, upstream, client, name="delay-proxy-down")

    def _pipe(self, src: socket.socket, dst: socket.socket) -> None:
        """One direction: a reader stamps each chunk with its due time; this thread sends each when due, in order."""
        queue: deque[tuple[float, bytes]] = deque()
        ready = threading.Condition()

        def read() -> None:
            last_due = 0.0
            while True:
                try:
                    data = src.recv(CHUNK)
                except OSError:
                    data = b""
                delay = self.delay_s + (self._random.uniform(0, self.jitter_s) if self.jitter_s else 0.0)
                last_due = max(last_due, time.monotonic() + delay)      # jitter never reorders bytes
                with ready:
                    queue.append((last_due, data))                      # b"": end of stream, also delayed
                    ready.notify()
                if not data:
                    return

        _thread(read, name="delay-proxy-read")
        while True:
            with ready:
                while not queue:
                    ready.wait()
                due, data = queue.popleft()
            wait = due - time.monotonic()
            if wait > 0:
                time.sleep(wait)
            # Counted before the send: a peer that has read the last byte must see it counted (counting after
            # sendall raced the reader, which can return before this thread runs again).
            with self._lock:
                self.bytes_forwarded += len(data)
            try:
                if not data:
                    dst.shutdown(socket.SHUT_WR)
                    return
                dst.sendall(data)
            except OSError:
                _close(src)
                return


def _thread(fn, *args, name: str) -> threading.Thread:
    t = threading.Thread(target=fn, args=args, name=name, daemon=True)
    t.start()
    return t


def _close(s: socket.socket) -> None:
    try:
        s.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    s.close()


def parse_route(text: str) -> Route:
    """LISTEN_HOST:PORT=UPSTREAM_HOST:PORT (the listen host is ignored: the proxy's own --host applies)."""
    try:
        listen, upstream = text.split("=")
        host, port = upstream.rsplit(":", 1)
        return Route(int(listen.rsplit(":", 1)[-1]), host, int(port))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--route {text!r}: expected LISTEN_PORT=HOST:PORT "
                                         "(or LISTEN_HOST:PORT=HOST:PORT)") from None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--route", action="append", type=parse_route, required=True)
    ap.add_argument("--delay-ms", type=float, default=0.0, help="one-way delay per direction")
    ap.add_argument("--jitter-ms", type=float, default=0.0, help="extra uniform [0, jitter] delay per chunk")
    ap.add_argument("--host", default="127.0.0.1")
    args = ap.parse_args(argv)
    proxy = DelayProxy(args.route, args.delay_ms / 1000, args.jitter_ms / 1000, args.host).start()
    for r in proxy.routes:
        print(f"{args.host}:{r.port} -> {r.upstream_host}:{r.upstream_port}, one-way delay {args.delay_ms} ms "
              f"(+ up to {args.jitter_ms} ms jitter)", flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        stop.wait()
    except KeyboardInterrupt:
        pass
    proxy.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
