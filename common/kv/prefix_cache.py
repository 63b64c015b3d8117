"""One rank's prefix cache: find the longest cached run of full KV blocks, publish new ones off the hot path.

Lookups try the in-process tier first, then Redis for the rest (one MGET); a hit from Redis is kept locally.
Redis values are sealed with an HMAC tag (block_auth.py) unless the config trusts Redis. Every value is checked on
load (tag, then header, token ids, length); a bad one is refused like a miss, deleted, and ends the hit run.
Publishing hands block copies to a background thread that encodes and stores them, so a round never waits
on the cache. Redis trouble (down, slow, full, garbage) never fails a request: the cache logs a warning,
counts it, and leaves Redis alone for `redis_retry_s`.
"""
from __future__ import annotations

import logging
import queue
import threading
import time

import torch
from opentelemetry import context as otel_context
from opentelemetry import trace

from common.config import PrefixCacheConfig
from common.kv.block_auth import BlockSigner
from common.kv.block_codec import BlockGeometry, decode_block, encode_block
from common.kv.block_store import LocalBlockStore, RedisBlockStore
from common.telemetry.metrics import (PREFIX_CACHE_BYPASS, PREFIX_CACHE_BYTES, PREFIX_CACHE_LOOKUPS,
                                      PREFIX_CACHE_REJECTED)

log = logging.getLogger(__name__)
tracer = trace.get_tracer(__name__)

KEY_PREFIX = "specd:kv:"
REJECT_WARN_EVERY_S = 10.0                  # a flood of forged values logs one warning per reason this often


def block_key(h: bytes) -> str:
    return KEY_PREFIX + h.hex()


class PrefixCache:
    def __init__(self, config: PrefixCacheConfig, geometry: BlockGeometry):
        self.config = config
        self.geometry = geometry
        self.local = LocalBlockStore(config.local_mib * 2**20) if config.local_mib else None
        self.redis = (RedisBlockStore(config.redis_url, config.ttl_s, config.redis_timeout_s, config.redis_password)
                      if config.redis_url else None)
        self.signer = BlockSigner(config.hmac_key) if config.hmac_key is not None else None
        self._rejects: dict[str, tuple[float, int]] = {}      # reason -> (last warning, refused since)
        if self.redis is not None and self.signer is None:
            log.warning("prefix cache: Redis values are NOT authenticated (--prefix-cache-unauthenticated): whoever "
                        "can write to Redis can steer outputs")
        self._redis_down_until = 0.0
        self._queue: queue.Queue = queue.Queue(maxsize=config.publish_queue)
        self._thread = threading.Thread(target=self._publish_loop, name="prefix-publish", daemon=True)
        self._thread.start()

    # ---- lookup (on the forward path) ---------------------------------------------------------------------
    def lookup(self, hashes: list[bytes], token_ids: list[int]) -> list[torch.Tensor]:
        """K/V [2, layers, block_size, kv_heads, head_dim] of the longest cached run of `hashes`' blocks."""
        bs = self.geometry.block_size
        with tracer.start_as_current_span("prefix_cache.lookup") as span:
            span.set_attribute("prefix_cache.blocks_wanted", len(hashes))
            found: list[torch.Tensor] = []
            keys = [block_key(h) for h in hashes]
            for tier in ("local", "redis"):
                if len(found) == len(keys):
                    break
                store = self.local if tier == "local" else self._redis_if_up()
                if store is None:
                    continue
                todo = keys[len(found):]
                try:
                    values = store.get_many(todo)
                except Exception as e:  # noqa: BLE001 - any Redis failure: bypass, never fail the request
                    self._redis_failed("lookup", e)
                    continue
                hits = []
                for i, (key, value) in enumerate(zip(todo, values)):
                    if value is None:
                        break
                    n = len(found) + i
                    loaded = self._load(store, key, value, token_ids[n * bs:(n + 1) * bs])
                    if loaded is None:
                        break
                    hits.append((key, *loaded))
                PREFIX_CACHE_LOOKUPS.labels(store.tier, "hit").inc(len(hits))
                PREFIX_CACHE_LOOKUPS.labels(store.tier, "miss").inc(len(hits) < len(todo))
                PREFIX_CACHE_BYTES.labels(store.tier, "load").inc(sum(len(v) for _, v, _ in hits))
                span.set_attribute(f"prefix_cache.{store.tier}_hits", len(hits))
                if store is not self.local and self.local is not None and hits:
                    self.local.put_many([(k, v) for k, v, _ in hits])
                found += [kv for _, _, kv in hits]             # a local run that ends early goes on in Redis
            span.set_attribute("prefix_cache.blocks_found", len(found))
            return found

    def _load(self, store, key: str, value: bytes, token_ids: list[int]) -> tuple[bytes, torch.Tensor] | None:
        """(payload, K/V) of a stored value; None after refusing and deleting a value that is not that block."""
        payload = self.signer.open(key, value) if store is self.redis and self.signer is not None else value
        kv = decode_block(self.geometry, token_ids, payload) if payload is not None else None
        if kv is None:
            self._refused(store, key, "bad_mac" if payload is None else "mismatch")
            self._delete(store, key)
            return None
        return payload, kv

    def _refused(self, store, key: str, reason: str) -> None:
        PREFIX_CACHE_REJECTED.labels(reason).inc()
        now = time.monotonic()
        last, since = self._rejects.get(reason, (-REJECT_WARN_EVERY_S, 0))
        if now - last < REJECT_WARN_EVERY_S:
            self._rejects[reason] = (last, since + 1)
            return
        self._rejects[reason] = (now, 0)
        what = ("its HMAC tag does not verify (forged, tampered, or written with another key)" if reason == "bad_mac"
                else "its header, length or token ids are not those of the block")
        log.warning("prefix cache (%s): refused and deleted %s: %s%s", store.tier, key, what,
                    f" ({since} more refused in the last {now - last:.0f}s)" if since else "")

    # ---- publish (off the forward path) -------------------------------------------------------------------
    def publish(self, hashes: list[bytes], token_ids: list[list[int]], kv: torch.Tensor) -> None:
        """Store full blocks in the background. kv: [n, 2, layers, block_size, kv_heads, head_dim], a copy."""
        if not hashes:
            return
        try:
            self._queue.put_nowait((hashes, token_ids, kv, otel_context.get_current()))
        except queue.Full:
            PREFIX_CACHE_BYPASS.labels("publish_queue_full").inc()

    def flush(self, timeout_s: float = 10.0) -> bool:
        """Wait until every queued publish is stored (tests and shutdown); False on timeout."""
        deadline = time.monotonic() + timeout_s
        while self._queue.unfinished_tasks:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.005)
        return True

    def close(self) -> None:
        if not self._thread.is_alive():
            return
        self.flush(2.0)
        self._queue.put(None)
        self._thread.join(timeout=5)
        if self.redis is not None:
            self.redis.close()

    def _publish_loop(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is None:
                    return
                hashes, token_ids, kv, ctx = item
                token = otel_context.attach(ctx)
                try:
                    self._store(hashes, token_ids, kv)
                finally:
                    otel_context.detach(token)
            except Exception:  # noqa: BLE001 - the publisher must survive anything
                log.exception("prefix cache publish failed")
            finally:
                self._queue.task_done()

    def _store(self, hashes: list[bytes], token_ids: list[list[int]], kv: torch.Tensor) -> None:
        with tracer.start_as_current_span("prefix_cache.publish") as span:
            keys = [block_key(h) for h in hashes]
            fresh = [i for i, k in enumerate(keys) if self.local is None or k not in self.local]
            span.set_attribute("prefix_cache.blocks", len(keys))
            span.set_attribute("prefix_cache.blocks_new", len(fresh))
            if not fresh:
                return
            kv = kv.to("cpu")
            items = [(keys[i], encode_block(self.geometry, token_ids[i], kv[i])) for i in fresh]
            nbytes = sum(len(v) for _, v in items)
            span.set_attribute("prefix_cache.bytes", nbytes)
            if self.local is not None:
                self.local.put_many(items)
                PREFIX_CACHE_BYTES.labels("local", "publish").inc(nbytes)
            redis = self._redis_if_up()
            if redis is not None:
                if self.signer is not None:
                    items = [(k, self.signer.seal(k, v)) for k, v in items]
                try:
                    redis.put_many(items)
                    PREFIX_CACHE_BYTES.labels("redis", "publish").inc(nbytes)
                except Exception as e:  # noqa: BLE001
                    self._redis_failed("publish", e)

    # ---- Redis health -------------------------------------------------------------------------------------
    def _redis_if_up(self) -> RedisBlockStore | None:
        if self.redis is None:
            return None
        if time.monotonic() < self._redis_down_until:
            PREFIX_CACHE_BYPASS.labels("redis_down").inc()
            return None
        return self.redis

    def _redis_failed(self, what: str, e: Exception) -> None:
        PREFIX_CACHE_LOOKUPS.labels("redis", "error").inc(what == "lookup")
        PREFIX_CACHE_BYPASS.labels(f"redis_{what}_error").inc()
        self._redis_down_until = time.monotonic() + self.config.redis_retry_s
        log.warning("prefix cache: Redis %s failed (%s: %s); bypassing Redis for %.1fs", what, type(e).__name__, e,
                    self.config.redis_retry_s)

    def _delete(self, store, key: str) -> None:
        try:
            store.delete(key)
        except Exception as e:  # noqa: BLE001
            self._redis_failed("delete", e)
