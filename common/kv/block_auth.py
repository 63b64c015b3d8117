"""HMAC-SHA256 tags on the values written to the shared (Redis) tier, so that Redis is no longer trusted with their
integrity: a value not tagged under this replica's key, for this very block key, is refused like a miss.

A sealed value is the codec's bytes followed by a 32-byte tag over (domain, store key, codec bytes). The store key
is inside the tag, so a genuine value copied under another block's key does not verify either.
"""
from __future__ import annotations

import hashlib
import hmac
import struct

TAG_BYTES = 32
MIN_KEY_BYTES = 16
_DOMAIN = b"specd-kv-hmac-v1\x00"


class BlockSigner:
    """Seals values before they go to Redis and opens (verifies and strips) what comes back."""
    __slots__ = ("_key",)

    def __init__(self, key: bytes):
        if len(key) < MIN_KEY_BYTES:
            raise ValueError(f"prefix cache HMAC key of {len(key)} bytes: must be >= {MIN_KEY_BYTES}")
        self._key = bytes(key)

    def _tag(self, store_key: str, payload) -> bytes:
        k = store_key.encode()
        mac = hmac.new(self._key, _DOMAIN + struct.pack("<I", len(k)) + k, hashlib.sha256)
        mac.update(payload)
        return mac.digest()

    def seal(self, store_key: str, payload: bytes) -> bytes:
        return payload + self._tag(store_key, payload)

    def open(self, store_key: str, value: bytes) -> bytes | None:
        """The payload of a value sealed under this key for `store_key`, or None (forged, tampered, other key)."""
        if len(value) < TAG_BYTES:
            return None
        payload = memoryview(value)[:-TAG_BYTES]
        if not hmac.compare_digest(self._tag(store_key, payload), value[-TAG_BYTES:]):
            return None
        return value[:-TAG_BYTES]

    def __repr__(self) -> str:                 # never the key itself
        return f"BlockSigner(sha256:{hashlib.sha256(self._key).hexdigest()[:8]})"
