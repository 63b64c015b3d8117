"""Gateway API keys and per-key rate limits, as a grpc.aio server interceptor.

Keys come from a file (one per line, `#` comments) and/or `SPECD_API_KEYS` (comma separated). A caller sends
`authorization: Bearer <key>` (or `x-api-key: <key>`). The presented key is hashed and compared with every
configured key's hash in constant time, so neither timing nor logs reveal keys: logs and spans name a key by
the first 8 hex digits of its sha256 only. Each key has a token bucket (`rate_per_s`, `burst`); an empty bucket
answers RESOURCE_EXHAUSTED at once. Health checks and reflection need no key. An admitted call's handler runs with
its key id in `current_key_id()` (the servicer names the caller's prefix-cache namespace with it).
"""
from __future__ import annotations

import hashlib
import hmac
import logging
import os
import threading
import time
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path

import grpc

from common.errors import ConfigError
from common.rpc.infra_methods import INFRA_METHOD_PREFIXES

log = logging.getLogger(__name__)

_KEY_ID: ContextVar[str] = ContextVar("specd_api_key_id", default="")

MIN_KEY_CHARS = 16
WARN_EVERY_S = 10.0                   # refusals are logged at most this often per key id / reason


def key_id(key: str) -> str:
    """How logs and spans name a key: never the key itself."""
    return hashlib.sha256(key.encode()).hexdigest()[:8]


def current_key_id() -> str:
    """The key id of the call being handled; "" without API keys (or outside a call)."""
    return _KEY_ID.get()


def bind_key_id(kid: str) -> None:
    """Run the rest of the current task as a call of key `kid` (the HTTP door, once it has identified the key)."""
    _KEY_ID.set(kid)


def load_api_keys(path: str | None = None, env: str | None = None) -> list[str]:
    """Keys from `path` (one per line, `#` comments) and `env` (default: $SPECD_API_KEYS, comma separated)."""
    keys: list[str] = []
    if path:
        try:
            lines = Path(path).read_text().splitlines()
        except OSError as e:
            raise ConfigError(f"--api-keys-file {path!r}: cannot be read ({e.strerror})") from None
        keys += [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]
    raw = env if env is not None else os.environ.get("SPECD_API_KEYS", "")
    keys += [k.strip() for k in raw.split(",") if k.strip()]
    # Errors name keys by id: a typo'd key must not end up in a log or a terminal scrollback either.
    short = [key_id(k) for k in keys if len(k) < MIN_KEY_CHARS]
    if short:
        raise ConfigError(f"API keys must be at least {MIN_KEY_CHARS} characters (keys with ids "
                          f"{', '.join(short)} are shorter)")
    unsendable = [key_id(k) for k in keys if not all(33 <= ord(c) <= 126 and c != "," for c in k)]
    if unsendable:
        raise ConfigError(f"API keys must be printable ASCII without spaces or commas, to travel in gRPC metadata "
                          f"(keys with ids {', '.join(unsendable)} are not)")
    return list(dict.fromkeys(keys))


@dataclass(slots=True)
class RateLimit:
    rate_per_s: float = 10.0         # sustained requests per second per key; 0 = no limit
    burst: int = 20                  # requests a key may send at once

    def __post_init__(self):
        if not (self.rate_per_s >= 0 and self.burst >= 1):       # `not >=` also refuses NaN
            raise ConfigError(f"rate limit {self.rate_per_s}/s burst {self.burst}: rate must be >= 0 "
                              "(0 = no limit), burst >= 1")

    @property
    def unlimited(self) -> bool:
        return self.rate_per_s == 0

    def describe(self) -> str:
        return "off" if self.unlimited else f"{self.rate_per_s:g} requests/s per key (burst {self.burst})"


class _Bucket:
    __slots__ = ("tokens", "stamp")

    def __init__(self, burst: int):
        self.tokens = float(burst)
        self.stamp = time.monotonic()


class ApiKeyAuth:
    def __init__(self, keys: list[str], limit: RateLimit | None = None):
        if not keys:
            raise ConfigError("ApiKeyAuth needs at least one key")
        self._digests = [(hashlib.sha256(k.encode()).digest(), key_id(k)) for k in keys]
        self.limit = limit or RateLimit()
        self._buckets: dict[str, _Bucket] = {}          # one per configured key at most: only valid keys get one
        self._lock = threading.Lock()
        self._last_warned: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}

    @property
    def key_ids(self) -> list[str]:
        return [kid for _, kid in self._digests]

    def identify(self, presented: str | None) -> str | None:
        """The key id of a valid key, else None; constant time in which key (if any) matched."""
        if not presented:
            return None
        digest = hashlib.sha256(presented.encode()).digest()
        match = None
        for d, kid in self._digests:
            if hmac.compare_digest(d, digest):
                match = kid
        return match

    def admit(self, kid: str) -> bool:
        """Take one token from the key's bucket; False when it is empty."""
        if self.limit.unlimited:
            return True
        now = time.monotonic()
        with self._lock:
            b = self._buckets.get(kid)
            if b is None:
                b = self._buckets[kid] = _Bucket(self.limit.burst)
            b.tokens = min(self.limit.burst, b.tokens + (now - b.stamp) * self.limit.rate_per_s)
            b.stamp = now
            if b.tokens < 1:
                return False
            b.tokens -= 1
            return True

    def refused(self, reason: str, message: str, kid: str = "") -> None:
        """Count a refused call (either door); log at most once per WARN_EVERY_S per (reason, key id), so a flood
        cannot flood the log. Never given the key itself."""
        from common.telemetry import metrics
        metrics.AUTH_REFUSED.labels(reason).inc()
        slot = f"{reason}:{kid}"
        now = time.monotonic()
        with self._lock:
            self._suppressed[slot] = self._suppressed.get(slot, 0) + 1
            if now - self._last_warned.get(slot, -WARN_EVERY_S) < WARN_EVERY_S:
                return
            count = self._suppressed.pop(slot)
            self._last_warned[slot] = now
        log.warning("%d %s", count, message)


def presented_key(metadata) -> str | None:
    for k, v in metadata or ():
        if k == "authorization" and isinstance(v, str) and v[:7].lower() == "bearer ":
            return v[7:].strip()
        if k == "x-api-key" and isinstance(v, str):
            return v.strip()
    return None


class ApiKeyInterceptor(grpc.aio.ServerInterceptor):
    """Put it first in the server's interceptor list: a refused call then never reaches the tracing interceptor
    (no span) and its request is never parsed."""

    def __init__(self, auth: ApiKeyAuth):
        self.auth = auth

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None or details.method.startswith(INFRA_METHOD_PREFIXES):
            return handler
        kid = self.auth.identify(presented_key(details.invocation_metadata))
        if kid is None:
            self.auth.refused("unauthenticated", "calls refused: missing or invalid API key")
            return _refusing(handler, grpc.StatusCode.UNAUTHENTICATED,
                             "missing or invalid API key: send 'authorization: Bearer <key>'")
        if not self.auth.admit(kid):
            self.auth.refused("rate_limited", f"calls refused: rate limit hit by key {kid}", kid)
            return _refusing(handler, grpc.StatusCode.RESOURCE_EXHAUSTED,
                             f"rate limit: {self.auth.limit.describe()}; retry later")
        return _with_key_id(handler, kid)


def _refusing(handler, code: grpc.StatusCode, message: str):
    """A handler of the same kind as `handler` that ends the call with `code` before doing anything (its request
    is not even deserialised)."""
    async def unary(request, context):
        await context.abort(code, message)

    async def streaming(request, context):
        await context.abort(code, message)
        yield  # pragma: no cover - makes this an async generator

    kw = dict(request_deserializer=_ignore, response_serializer=handler.response_serializer)
    if handler.response_streaming and not handler.request_streaming:
        return grpc.unary_stream_rpc_method_handler(streaming, **kw)
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(streaming, **kw)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(unary, **kw)
    return grpc.unary_unary_rpc_method_handler(unary, **kw)


def _with_key_id(handler, kid: str):
    """`handler`, run with `current_key_id()` = `kid`: set inside the handler's own task, so the servicer sees it
    whatever task ran the interceptor."""
    kw = dict(request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer)
    if handler.response_streaming:
        inner = handler.unary_stream or handler.stream_stream

        async def streaming(request, context):
            _KEY_ID.set(kid)
            async for item in inner(request, context):
                yield item
        make = (grpc.stream_stream_rpc_method_handler if handler.request_streaming
                else grpc.unary_stream_rpc_method_handler)
        return make(streaming, **kw)
    inner = handler.unary_unary or handler.stream_unary

    async def unary(request, context):
        _KEY_ID.set(kid)
        return await inner(request, context)
    make = grpc.stream_unary_rpc_method_handler if handler.request_streaming else grpc.unary_unary_rpc_method_handler
    return make(unary, **kw)


def _ignore(_: bytes) -> None:
    return None
