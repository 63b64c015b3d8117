"""Where cached KV blocks live: one interface, two back-ends.

`LocalBlockStore` is an in-process LRU bounded in bytes (the default, and the first tier when Redis is
configured). `RedisBlockStore` is a shared `redis-server` (values carry a TTL; the server's own maxmemory
policy evicts; TLS and AUTH come from the URL); its calls raise `redis.RedisError` on any trouble and the caller
decides to bypass. Neither store authenticates values: the prefix cache seals what it sends to Redis.
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Protocol


class BlockStore(Protocol):
    tier: str

    def get_many(self, keys: list[str]) -> list[bytes | None]: ...
    def put_many(self, items: list[tuple[str, bytes]]) -> None: ...
    def delete(self, key: str) -> None: ...
    def __contains__(self, key: str) -> bool: ...


class LocalBlockStore:
    tier = "local"

    def __init__(self, capacity_bytes: int):
        if capacity_bytes < 0:
            raise ValueError(f"capacity_bytes={capacity_bytes}: must be >= 0")
        self.capacity_bytes = capacity_bytes
        self.nbytes = 0
        self._items: OrderedDict[str, bytes] = OrderedDict()
        self._lock = threading.Lock()

    def get_many(self, keys: list[str]) -> list[bytes | None]:
        with self._lock:
            out = []
            for k in keys:
                v = self._items.get(k)
                if v is not None:
                    self._items.move_to_end(k)
                out.append(v)
            return out

    def put_many(self, items: list[tuple[str, bytes]]) -> None:
        with self._lock:
            for k, v in items:
                if len(v) > self.capacity_bytes:
                    continue
                old = self._items.pop(k, None)
                if old is not None:
                    self.nbytes -= len(old)
                self._items[k] = v
                self.nbytes += len(v)
                while self.nbytes > self.capacity_bytes:
                    _, dropped = self._items.popitem(last=False)
                    self.nbytes -= len(dropped)

    def delete(self, key: str) -> None:
        with self._lock:
            v = self._items.pop(key, None)
            if v is not None:
                self.nbytes -= len(v)

    def __contains__(self, key: str) -> bool:
        with self._lock:
            return key in self._items

    def __len__(self) -> int:
        return len(self._items)


class RedisBlockStore:
    tier = "redis"

    def __init__(self, url: str, ttl_s: int, timeout_s: float, password: str | None = None):
        """`url`: redis://[user[:password]@]host:port/db, rediss://... for TLS (CA and client certificate as query
        parameters: ?ssl_ca_certs=/ca.pem&ssl_certfile=...&ssl_keyfile=...), or unix://path. `password`: AUTH,
        when it is not in the URL (redis-py lets the URL's own password win)."""
        import redis
        self.url = url
        self.ttl_s = ttl_s
        auth = {"password": password} if password is not None else {}
        self.client = redis.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s,
                                           health_check_interval=0, **auth)

    def get_many(self, keys: list[str]) -> list[bytes | None]:
        return self.client.mget(keys) if keys else []

    def put_many(self, items: list[tuple[str, bytes]]) -> None:
        if not items:
            return
        pipe = self.client.pipeline(transaction=False)
        for k, v in items:
            pipe.set(k, v, ex=self.ttl_s)
        pipe.execute()

    def delete(self, key: str) -> None:
        self.client.delete(key)

    def __contains__(self, key: str) -> bool:
        return bool(self.client.exists(key))

    def close(self) -> None:
        self.client.close()
