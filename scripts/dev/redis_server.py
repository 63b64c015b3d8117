"""A local `redis-server` process on loopback: `specd up-local`, the tests and the benchmarks start it this way."""
from __future__ import annotations

import shutil
import socket
import subprocess
import time

from common.distributed import free_port


def redis_server_argv(port: int, maxmemory: str = "256mb", policy: str = "allkeys-lru") -> list[str] | None:
    """The command line of a throwaway cache server (no persistence), or None when redis-server is missing."""
    exe = shutil.which("redis-server")
    if exe is None:
        return None
    return [exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
            "--maxmemory", maxmemory, "--maxmemory-policy", policy, "--loglevel", "warning"]


def redis_answers(port: int) -> bool:
    """True when something on 127.0.0.1:`port` answers PING like Redis."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")
    except OSError:
        return False


class RedisServer:
    """A redis-server of its own, for a test or a benchmark; `stop()` (or `kill()`) ends it."""

    def __init__(self, maxmemory: str = "64mb", policy: str = "allkeys-lru", timeout_s: float = 10.0):
        self.port = free_port()
        argv = redis_server_argv(self.port, maxmemory, policy)
        if argv is None:
            raise RuntimeError("redis-server is not installed (apt-get install redis-server; `make test` does it)")
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.url = f"redis://127.0.0.1:{self.port}/0"
        deadline = time.monotonic() + timeout_s
        while not redis_answers(self.port):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"redis-server did not answer PING on 127.0.0.1:{self.port}")
            time.sleep(0.05)

    def client(self):
        import redis
        return redis.Redis(port=self.port, socket_timeout=2)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    kill = stop
