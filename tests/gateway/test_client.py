"""gateway/client.py: an API key is never sent in plaintext off the host; the check happens at construction, so no
server is needed."""
from __future__ import annotations

import pytest

from common.errors import ConfigError
from common.rpc.tls import PLAINTEXT, TLSConfig
from gateway.client import SpecdClient, is_loopback, target_host

KEY = "k-" + "x" * 30
LOOPBACK = ["127.0.0.1:50051", "127.8.9.10:1", "localhost:50051", "LOCALHOST:1", "localhost", "[::1]:50051", "::1",
            "dns:///localhost:50051", "dns://8.8.8.8/127.0.0.1:50051", "ipv4:127.0.0.1:50051", "ipv6:[::1]:50051",
            "[::ffff:127.0.0.1]:50051", "unix:/tmp/specd.sock", "unix-abstract:specd"]
REMOTE = ["10.0.0.5:50051", "gateway.example.com:50051", "gateway:50051", "[2001:db8::1]:50051", "0.0.0.0:50051",
          "dns:///gateway.example.com:443", "ipv4:192.168.1.2:50051", "127.0.0.1.nip.io:50051", "localhost.evil.com:1",
          "128.0.0.1:50051"]


@pytest.mark.parametrize("target", LOOPBACK)
def test_loopback_targets(target):
    assert is_loopback(target)


@pytest.mark.parametrize("target", REMOTE)
def test_remote_targets(target):
    assert not is_loopback(target)


def test_target_host_reads_every_form():
    assert [target_host(t) for t in ("h:1", "[::1]:2", "dns:///h:3", "dns://ns/h:4", "ipv4:1.2.3.4:5,6.7.8.9:5",
                                     "ipv6:[fe80::1]:6", "h")] == ["h", "::1", "h", "h", "1.2.3.4", "fe80::1", "h"]


@pytest.mark.parametrize("tls", [None, PLAINTEXT], ids=["default", "insecure"])
@pytest.mark.parametrize("target", REMOTE)
def test_a_key_over_plaintext_to_another_host_is_refused(target, tls):
    with pytest.raises(ConfigError) as e:
        SpecdClient(target, tls=tls, api_key=KEY)
    message = str(e.value)
    assert repr(target) in message and "tls=TLSConfig(ca=" in message and "127.0.0.0/8, ::1, localhost" in message
    assert KEY not in message


@pytest.mark.parametrize("target", LOOPBACK)
def test_a_key_over_plaintext_to_loopback_is_allowed(target):
    SpecdClient(target, api_key=KEY).close()               # a channel connects lazily: nothing listens here


@pytest.mark.parametrize("target", REMOTE)
def test_plaintext_without_a_key_and_a_key_over_tls_are_allowed(target):
    SpecdClient(target).close()
    SpecdClient(target, tls=TLSConfig(), api_key=KEY).close()        # TLS with the system's roots
    SpecdClient(target, api_key="").close()                          # an empty key is no key: nothing is sent
