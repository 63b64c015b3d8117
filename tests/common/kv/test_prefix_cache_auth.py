"""Redis is not trusted with the cached K/V's integrity: values carry an HMAC tag (common/kv/block_auth.py).

Forged, tampered and other-key values are refused (a miss), deleted and counted, and the output equals that of a
runner without any cache; Redis AUTH and TLS come from the URL or a password; a wrong password only bypasses Redis.
"""
import logging

import pytest
import torch

from common.config import PrefixCacheConfig
from common.engine.model_runner import SequenceChunk
from common.errors import ConfigError
from common.kv.block_auth import TAG_BYTES, BlockSigner
from common.kv.block_codec import encode_block
from common.kv.prefix_cache import KEY_PREFIX
from common.telemetry.metrics import PREFIX_CACHE_BYPASS, PREFIX_CACHE_REJECTED
from scripts.dev.redis_server import RedisServer
from tests.common.kv.conftest import BS, HMAC_KEY, SYSTEM, _flush, _prefill_and_commit, _runner

TURN = [9, 8, 7, 6]


def _rejected(reason: str) -> float:
    return PREFIX_CACHE_REJECTED.labels(reason)._value.get()


def _cfg(url: str, key: bytes | None = HMAC_KEY, **kw) -> PrefixCacheConfig:
    return PrefixCacheConfig(local_mib=0, redis_url=url, hmac_key=key, **kw)      # Redis only: every lookup asks it


def _published(ckpt, cfg):
    """A replica that has published SYSTEM's two full blocks; returns it and their keys."""
    writer = _runner(ckpt, cfg)
    _prefill_and_commit(writer, 1, SYSTEM + [1, 2, 3])
    _flush(writer)
    return writer, [KEY_PREFIX + h.hex() for h in writer._hashes[1][:2]]


def _read_back(ckpt, cfg, reference):
    """Cached tokens of a fresh replica's prefill of SYSTEM + TURN; its logits must equal the uncached ones."""
    reader = _runner(ckpt, cfg)
    try:
        fwd = reader.forward([SequenceChunk(1, SYSTEM + TURN)])
        torch.testing.assert_close(fwd.logits[0], reference[tuple(TURN)], rtol=0, atol=1e-5)
        return fwd.cached_tokens[0]
    finally:
        reader.close()


def test_sealed_values_hit(ckpt, reference, redis_server):
    writer, keys = _published(ckpt, _cfg(redis_server.url))
    value = redis_server.client().get(keys[0])
    assert len(value) == writer.prefix_cache.geometry.value_bytes + TAG_BYTES
    assert _read_back(ckpt, _cfg(redis_server.url), reference) == 2 * BS
    writer.close()


def test_a_value_written_without_the_key_is_refused_and_deleted(ckpt, reference, redis_server, caplog):
    writer, keys = _published(ckpt, _cfg(redis_server.url))
    geometry, client = writer.prefix_cache.geometry, redis_server.client()
    evil = torch.full(geometry.shape, 3.0, dtype=geometry.dtype)          # K/V that would steer the output
    for i, key in enumerate(keys):                                         # well-formed, right token ids, no key
        payload = encode_block(geometry, SYSTEM[i * BS:(i + 1) * BS], evil)
        client.set(key, payload if i == 0 else BlockSigner(b"an attacker's own key!").seal(key, payload))
    before = _rejected("bad_mac")
    with caplog.at_level(logging.WARNING, logger="common.kv.prefix_cache"):
        assert _read_back(ckpt, _cfg(redis_server.url), reference) == 0
    assert _rejected("bad_mac") == before + 1           # the run ends at the first refused block
    assert client.get(keys[0]) is None
    assert "HMAC tag does not verify" in caplog.text
    writer.close()


def test_one_flipped_byte_is_refused_and_deleted(ckpt, reference, redis_server):
    writer, keys = _published(ckpt, _cfg(redis_server.url))
    client = redis_server.client()
    value = bytearray(client.get(keys[1]))
    value[len(value) // 2] ^= 0x01                      # one bit of block 1's K/V; tag and length intact
    client.set(keys[1], bytes(value))
    before = _rejected("bad_mac")
    assert _read_back(ckpt, _cfg(redis_server.url), reference) == BS      # block 0 still hits
    assert _rejected("bad_mac") == before + 1 and client.get(keys[1]) is None and client.get(keys[0])
    writer.close()


def test_a_value_moved_to_another_blocks_key_is_refused(ckpt, reference, redis_server):
    writer, keys = _published(ckpt, _cfg(redis_server.url))
    client = redis_server.client()
    client.set(keys[1], client.get(keys[0]))            # genuine, but sealed for block 0's key
    assert _read_back(ckpt, _cfg(redis_server.url), reference) == BS
    assert client.get(keys[1]) is None
    writer.close()


def test_a_replica_with_another_key_misses_without_errors(ckpt, reference, redis_server):
    writer, keys = _published(ckpt, _cfg(redis_server.url))
    errors = PREFIX_CACHE_BYPASS.labels("redis_lookup_error")._value.get()
    assert _read_back(ckpt, _cfg(redis_server.url, key=b"another replica's key"), reference) == 0
    assert PREFIX_CACHE_BYPASS.labels("redis_lookup_error")._value.get() == errors
    assert redis_server.client().get(keys[0]) is None   # what it cannot verify it deletes
    writer.close()


def test_unauthenticated_mode_must_be_asked_for_and_trusts_redis(ckpt, reference, redis_server):
    with pytest.raises(ConfigError, match="HMAC key"):
        PrefixCacheConfig(redis_url=redis_server.url)
    cfg = _cfg(redis_server.url, key=None, unauthenticated=True)
    writer, keys = _published(ckpt, cfg)
    assert len(redis_server.client().get(keys[0])) == writer.prefix_cache.geometry.value_bytes   # no tag
    assert _read_back(ckpt, cfg, reference) == 2 * BS
    assert _read_back(ckpt, _cfg(redis_server.url), reference) == 0       # a keyed replica refuses untagged values
    writer.close()


@pytest.fixture()
def redis_with_password():
    server = RedisServer(password="s3cret-pass")
    yield server
    server.stop()


def test_redis_auth_with_a_password_file_or_the_url(ckpt, reference, redis_with_password):
    url = redis_with_password.url
    writer, keys = _published(ckpt, _cfg(url, redis_password="s3cret-pass"))
    assert redis_with_password.client().get(keys[0])
    with_user = url.replace("redis://", "redis://default:s3cret-pass@")
    assert _read_back(ckpt, _cfg(with_user), reference) == 2 * BS
    with pytest.raises(ConfigError, match="both"):
        _cfg(with_user, redis_password="s3cret-pass")
    writer.close()


@pytest.mark.parametrize("password", ["wrong", None])
def test_a_wrong_or_missing_password_bypasses_redis_with_a_warning(ckpt, reference, redis_with_password, caplog,
                                                                   password):
    writer, _ = _published(ckpt, _cfg(redis_with_password.url, redis_password="s3cret-pass"))
    errors = PREFIX_CACHE_BYPASS.labels("redis_lookup_error")._value.get()
    with caplog.at_level(logging.WARNING, logger="common.kv.prefix_cache"):
        assert _read_back(ckpt, _cfg(redis_with_password.url, redis_password=password), reference) == 0
    assert PREFIX_CACHE_BYPASS.labels("redis_lookup_error")._value.get() == errors + 1
    assert "AuthenticationError" in caplog.text and "bypassing Redis" in caplog.text
    assert "s3cret" not in caplog.text
    writer.close()


def test_rediss_url_with_a_ca(ckpt, reference, tmp_path):
    from tests.certs import write_pki
    pki = write_pki(tmp_path / "pki")
    server = RedisServer(tls=(pki.cert, pki.key, pki.ca))
    try:
        assert server.url.startswith("rediss://") and "ssl_ca_certs=" in server.url
        writer, _ = _published(ckpt, _cfg(server.url))
        assert len(server.client().keys(KEY_PREFIX + "*")) == 2
        assert _read_back(ckpt, _cfg(server.url), reference) == 2 * BS
        untrusted = server.url.split("?")[0]            # the system's roots: the server's certificate is refused
        assert _read_back(ckpt, _cfg(untrusted, redis_timeout_s=1.0), reference) == 0
        writer.close()
    finally:
        server.stop()
