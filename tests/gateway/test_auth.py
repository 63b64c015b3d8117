"""Gateway API keys: UNAUTHENTICATED for a missing or wrong key, RESOURCE_EXHAUSTED past a key's rate limit, health
open to all, and keys never in logs or spans. A loopback server with the interceptors in the gateway's order (auth,
then tracing) and a fake Gateway servicer; the real three-process check is in test_secure_e2e.py."""
import logging

import grpc
import pytest
from grpc_health.v1 import health, health_pb2_grpc

from common.errors import ConfigError
from common.rpc.generated.specd.v1 import gateway_pb2, gateway_pb2_grpc
from common.rpc.health_check import check
from common.telemetry import metrics
from common.telemetry.server_interceptor import server_interceptors
from gateway import auth as auth_module
from gateway.auth import ApiKeyAuth, ApiKeyInterceptor, RateLimit, key_id, load_api_keys
from gateway.client import SpecdClient
from tests.certs import write_pki
from tests.common.rpc.loopback import BackgroundServer
from tests.grpc_status import status_of

KEY = "sk-test-0123456789abcdef-alpha"
OTHER_KEY = "sk-test-0123456789abcdef-bravo"
WRONG_KEY = "sk-test-0123456789abcdef-wrong"


class FakeGateway(gateway_pb2_grpc.GatewayServicer):
    async def Generate(self, request, context):
        return gateway_pb2.GenerateReply(text="ok", token_ids=[1, 2], finish_reason="length")

    async def GenerateStream(self, request, context):
        for i in range(2):
            yield gateway_pb2.GenerateChunk(text=f"t{i}", token_ids=[i])


def _gateway(keys, limit=RateLimit(), provider=None, credentials=None) -> BackgroundServer:
    async def build():
        interceptors = [ApiKeyInterceptor(ApiKeyAuth(keys, limit)), *server_interceptors(provider)]
        server = grpc.aio.server(interceptors=interceptors)
        gateway_pb2_grpc.add_GatewayServicer_to_server(FakeGateway(), server)
        health_pb2_grpc.add_HealthServicer_to_server(health.aio.HealthServicer(), server)
        address = "127.0.0.1:0"
        port = server.add_secure_port(address, credentials) if credentials else server.add_insecure_port(address)
        await server.start()
        return server, port
    return BackgroundServer(build)


@pytest.fixture()
def gateway(provider):
    with _gateway([KEY, OTHER_KEY], RateLimit(rate_per_s=0.01, burst=3), provider) as server:
        yield server


def _stub(target):
    channel = grpc.insecure_channel(target)
    return channel, gateway_pb2_grpc.GatewayStub(channel)


def test_missing_or_wrong_key_is_unauthenticated_and_the_right_one_passes(gateway):
    channel, stub = _stub(gateway.target)
    req = gateway_pb2.GenerateRequest(prompt="hi")
    with channel:
        assert status_of(lambda: stub.Generate(req, timeout=5)) is grpc.StatusCode.UNAUTHENTICATED
        assert status_of(lambda: list(stub.GenerateStream(req, timeout=5))) is grpc.StatusCode.UNAUTHENTICATED
        for metadata in ((("authorization", f"Bearer {WRONG_KEY}"),), (("authorization", WRONG_KEY),),
                         (("x-api-key", WRONG_KEY),), (("authorization", "Bearer "),)):
            call = lambda: stub.Generate(req, timeout=5, metadata=metadata)  # noqa: E731
            assert status_of(call) is grpc.StatusCode.UNAUTHENTICATED
        assert stub.Generate(req, timeout=5, metadata=(("authorization", f"bearer {KEY}"),)).text == "ok"
        assert len(list(stub.GenerateStream(req, timeout=5, metadata=(("x-api-key", OTHER_KEY),)))) == 2
    with SpecdClient(gateway.target, timeout_s=5, api_key=KEY) as client:          # the Python client sends it
        assert client.generate("hi").text == "ok"


def test_the_refusal_says_what_to_send(gateway):
    channel, stub = _stub(gateway.target)
    with channel, pytest.raises(grpc.RpcError) as e:
        stub.Generate(gateway_pb2.GenerateRequest(prompt="hi"), timeout=5)
    assert e.value.code() is grpc.StatusCode.UNAUTHENTICATED and "authorization: Bearer" in e.value.details()


def test_health_needs_no_key(gateway):
    assert check(gateway.target) == (True, f"{gateway.target}: SERVING")


def test_rate_limit_per_key_is_resource_exhausted(gateway):
    before = metrics.AUTH_REFUSED.labels("rate_limited")._value.get()
    with SpecdClient(gateway.target, timeout_s=5, api_key=KEY) as a, \
            SpecdClient(gateway.target, timeout_s=5, api_key=OTHER_KEY) as b:
        codes = [status_of(lambda: a.generate("hi")) for _ in range(5)]
        assert codes == [grpc.StatusCode.OK] * 3 + [grpc.StatusCode.RESOURCE_EXHAUSTED] * 2    # burst 3
        with pytest.raises(grpc.RpcError) as e:
            list(a.stream("hi"))
        assert e.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED and "requests/s per key" in e.value.details()
        assert b.generate("hi").text == "ok"                                # another key has its own bucket
    assert metrics.AUTH_REFUSED.labels("rate_limited")._value.get() - before == 3


def test_keys_never_appear_in_logs_or_spans(gateway, exporter, caplog):
    caplog.set_level(logging.DEBUG)
    channel, stub = _stub(gateway.target)
    req = gateway_pb2.GenerateRequest(prompt="hi")
    with channel:
        for key in (KEY, WRONG_KEY, KEY, KEY, KEY):                     # ok, wrong, ok, ok, rate limited
            status_of(lambda: stub.Generate(req, timeout=5, metadata=(("authorization", f"Bearer {key}"),)))
        status_of(lambda: list(stub.GenerateStream(req, timeout=5, metadata=(("x-api-key", OTHER_KEY),))))
    spans = exporter.get_finished_spans()
    # Auth runs first: refused calls open no span; the admitted ones (3 with KEY, 1 stream) do.
    assert len(spans) == 4 and {s.name for s in spans} == {"specd.v1.Gateway/Generate",
                                                           "specd.v1.Gateway/GenerateStream"}
    dumped = "\n".join(s.to_json() for s in spans)
    records = "\n".join(f"{r.name} {r.getMessage()} {r.args!r}" for r in caplog.records)
    assert f"rate limit hit by key {key_id(KEY)}" in records                 # named by id
    for key in (KEY, OTHER_KEY, WRONG_KEY):
        assert key not in dumped and key not in records and key not in caplog.text


def test_refusals_are_logged_at_most_every_few_seconds(gateway, caplog, monkeypatch):
    caplog.set_level(logging.WARNING, logger="gateway.auth")
    channel, stub = _stub(gateway.target)
    with channel:
        for _ in range(20):
            status_of(lambda: stub.Generate(gateway_pb2.GenerateRequest(prompt="hi"), timeout=5))
    refusals = [r for r in caplog.records if "missing or invalid API key" in r.getMessage()]
    assert len(refusals) == 1 and refusals[0].getMessage().startswith("1 ")


def test_api_keys_over_tls(tmp_path):
    pki = write_pki(tmp_path / "pki")
    with _gateway([KEY], credentials=pki.server(mutual=False).server_credentials("gateway")) as server:
        with SpecdClient(server.target, timeout_s=5, tls=pki.client(with_cert=False), api_key=KEY) as client:
            assert client.generate("hi").text == "ok"
        with SpecdClient(server.target, timeout_s=5, tls=pki.client(with_cert=False)) as client:
            assert status_of(lambda: client.generate("hi")) is grpc.StatusCode.UNAUTHENTICATED
        with SpecdClient(server.target, timeout_s=5, api_key=KEY) as plaintext:
            assert status_of(lambda: plaintext.generate("hi")) is grpc.StatusCode.UNAVAILABLE


# ---- configuration --------------------------------------------------------------------------------------------

def test_keys_load_from_a_file_and_the_environment(tmp_path, monkeypatch):
    path = tmp_path / "keys"
    path.write_text(f"# team A\n{KEY}\n\n  {OTHER_KEY}  \n{KEY}\n")
    monkeypatch.setenv("SPECD_API_KEYS", f" {WRONG_KEY} ,,")
    assert load_api_keys(str(path)) == [KEY, OTHER_KEY, WRONG_KEY]
    monkeypatch.delenv("SPECD_API_KEYS")
    assert load_api_keys(None) == []


@pytest.mark.parametrize("bad, message", [("short-key", "at least 16"), ("has a space in it sadly", "printable")])
def test_unusable_keys_are_refused_by_id_never_by_value(bad, message):
    with pytest.raises(ConfigError, match=message) as e:
        load_api_keys(None, env=bad)
    assert bad not in str(e.value) and key_id(bad) in str(e.value)


def test_an_unreadable_keys_file_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="--api-keys-file .* cannot be read"):
        load_api_keys(str(tmp_path / "missing"), env="")


@pytest.mark.parametrize("rate, burst", [(-1, 5), (1, 0), (float("nan"), 5)])
def test_rate_limit_settings_are_checked(rate, burst):
    with pytest.raises(ConfigError):
        RateLimit(rate, burst)


def test_the_bucket_refills_at_the_configured_rate(monkeypatch):
    now = [100.0]
    monkeypatch.setattr(auth_module.time, "monotonic", lambda: now[0])
    auth = ApiKeyAuth([KEY], RateLimit(rate_per_s=2, burst=2))
    kid = auth.identify(KEY)
    assert [auth.admit(kid) for _ in range(3)] == [True, True, False]
    now[0] += 0.5                                                            # one token back
    assert [auth.admit(kid) for _ in range(2)] == [True, False]
    now[0] += 60                                                             # never more than the burst
    assert [auth.admit(kid) for _ in range(3)] == [True, True, False]
    assert all(ApiKeyAuth([KEY], RateLimit(0, 1)).admit(kid) for _ in range(100))   # 0 = no limit


def test_identify_matches_only_configured_keys():
    auth = ApiKeyAuth([KEY, OTHER_KEY])
    assert auth.identify(KEY) == key_id(KEY) and auth.identify(OTHER_KEY) == key_id(OTHER_KEY)
    assert auth.identify(WRONG_KEY) is None and auth.identify("") is None and auth.identify(None) is None


def test_gateway_flags_configure_keys_and_limits(tmp_path, monkeypatch, caplog):
    from scripts.cli import build_parser
    from common.rpc.tls import PLAINTEXT
    from gateway.main import api_key_interceptors, check_args
    monkeypatch.delenv("SPECD_API_KEYS", raising=False)
    path = tmp_path / "keys"
    path.write_text(KEY + "\n")
    args = build_parser().parse_args(["gateway", "--insecure", "--api-keys-file", str(path), "--rate-limit-rps", "5",
                                      "--rate-limit-burst", "7"])
    check_args(args)
    with caplog.at_level(logging.INFO, logger="specd.gateway"):
        [interceptor] = api_key_interceptors(args, PLAINTEXT)
    assert interceptor.auth.limit == RateLimit(5.0, 7) and interceptor.auth.key_ids == [key_id(KEY)]
    assert key_id(KEY) in caplog.text and KEY not in caplog.text
    caplog.clear()
    monkeypatch.setenv("SPECD_API_KEYS_FILE", "")
    args = build_parser().parse_args(["gateway", "--insecure"])
    with caplog.at_level(logging.WARNING, logger="specd.gateway"):
        assert api_key_interceptors(args, PLAINTEXT) == []
    assert "no API keys and PLAINTEXT" in caplog.text
