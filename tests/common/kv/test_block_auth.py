"""BlockSigner's tags, and the flags that give the prefix cache its HMAC key and Redis password (the default:
a Redis URL without a key refuses to start unless --prefix-cache-unauthenticated says so)."""
import argparse
import os
from unittest import mock

import pytest

from common.config import PrefixCacheConfig, redacted_url
from common.errors import ConfigError
from common.kv.block_auth import TAG_BYTES, BlockSigner
from common.rpc.flags import add_model_flags, prefix_cache_config

KEY = b"0123456789abcdef0123"


def test_seal_and_open_round_trip_and_refusals():
    signer = BlockSigner(KEY)
    value = signer.seal("specd:kv:aa", b"payload")
    assert len(value) == len(b"payload") + TAG_BYTES and signer.open("specd:kv:aa", value) == b"payload"
    assert signer.open("specd:kv:bb", value) is None                    # the key is inside the tag
    assert BlockSigner(KEY[::-1]).open("specd:kv:aa", value) is None    # another secret
    for i in range(len(value)):                                         # any flipped bit, tag included
        flipped = bytearray(value)
        flipped[i] ^= 0x80
        assert signer.open("specd:kv:aa", bytes(flipped)) is None
    assert signer.open("specd:kv:aa", value[:-1]) is None and signer.open("specd:kv:aa", b"") is None
    assert KEY.decode() not in repr(signer)


def test_short_keys_are_refused():
    with pytest.raises(ValueError, match=">= 16"):
        BlockSigner(b"short")
    with pytest.raises(ConfigError, match=">= 16"):
        PrefixCacheConfig(redis_url="redis://h:6379/0", hmac_key=b"short")


def test_secrets_never_show_in_reprs_or_errors():
    cfg = PrefixCacheConfig(redis_url="redis://h:6379/0", hmac_key=KEY, redis_password="pw-secret")
    assert KEY.decode() not in repr(cfg) and "pw-secret" not in repr(cfg)
    assert redacted_url("rediss://user:pw-secret@h:6380/0?ssl_ca_certs=/ca.pem") == \
        "rediss://user:***@h:6380/0?ssl_ca_certs=/ca.pem"
    with pytest.raises(ConfigError) as e:
        PrefixCacheConfig(redis_url="http://u:pw-secret@h/")
    assert "pw-secret" not in str(e.value)


def _args(*argv, env=None):
    p = argparse.ArgumentParser()
    with mock.patch.dict(os.environ, env or {}, clear=True):
        add_model_flags(p)
        return p.parse_args(list(argv))


def test_a_redis_url_needs_a_key_file_or_the_explicit_opt_out(tmp_path):
    with pytest.raises(ConfigError, match="--prefix-cache-hmac-key-file"):
        prefix_cache_config(_args("--redis-url", "redis://h:6379/0"))
    cfg = prefix_cache_config(_args("--redis-url", "redis://h:6379/0", "--prefix-cache-unauthenticated"))
    assert cfg.unauthenticated and cfg.hmac_key is None
    assert prefix_cache_config(_args()).redis_url is None                # in-process only: no key needed
    (tmp_path / "key").write_bytes(KEY + b"\n")
    (tmp_path / "pw").write_text("pw-secret\n")
    cfg = prefix_cache_config(_args(env={"REDIS_URL": "redis://h:6379/0",
                                         "SPECD_PREFIX_CACHE_HMAC_KEY_FILE": str(tmp_path / "key"),
                                         "SPECD_REDIS_PASSWORD_FILE": str(tmp_path / "pw")}))
    assert cfg.hmac_key == KEY and cfg.redis_password == "pw-secret"     # the newline is not part of it


def test_unreadable_or_empty_secret_files_say_which(tmp_path):
    with pytest.raises(ConfigError, match="--prefix-cache-hmac-key-file .*cannot be read"):
        prefix_cache_config(_args("--redis-url", "redis://h", "--prefix-cache-hmac-key-file", str(tmp_path / "no")))
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(ConfigError, match="--redis-password-file .*is empty"):
        prefix_cache_config(_args("--redis-url", "redis://h", "--prefix-cache-unauthenticated",
                                  "--redis-password-file", str(tmp_path / "empty")))
