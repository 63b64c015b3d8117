"""TLS on every hop: a ServiceHost with a throwaway CA accepts only clients holding a certificate that CA signed
(mTLS), refuses plaintext, and a service with neither certificates nor --insecure refuses to start."""
import subprocess
import sys
import time

import grpc
import pytest

from scripts.cli import main
from common.errors import ConfigError
from common.rpc.generated.specd.v1 import draft_pb2, draft_pb2_grpc
from common.rpc.health_check import check
from common.rpc.server import ServerConfig, ServiceHost
from common.rpc.tls import PLAINTEXT, TLSConfig, sync_channel
from tests.certs import write_pki
from tests.common.rpc.loopback import BackgroundServer
from tests.common.telemetry.loopback import FakeDraft

DRAFT = "specd.v1.DraftService"


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return write_pki(tmp_path_factory.mktemp("pki"))


def _host(tls: TLSConfig | None, health_port: int = 0) -> BackgroundServer:
    """A real ServiceHost (as the services bind it) with a fake DraftService, SERVING."""
    async def build():
        host = ServiceHost(ServerConfig(port=0, tls=tls, health_port=health_port), [DRAFT])
        draft_pb2_grpc.add_DraftServiceServicer_to_server(FakeDraft(), host.server)
        await host.server.start()
        if host.health_server is not None:
            await host.health_server.start()
            background.also_stop.append(host.health_server)
        await host.set_serving(True)
        return host.server, host.port
    background = BackgroundServer(build)
    return background


def _propose(target: str, tls: TLSConfig | None, timeout: float = 3.0):
    with sync_channel(target, tls) as channel:
        return draft_pb2_grpc.DraftServiceStub(channel).Propose(draft_pb2.ProposeRequest(context_token_ids=[1], k=2),
                                                                timeout=timeout)


@pytest.fixture(scope="module")
def mtls_server(pki):
    with _host(pki.server(mutual=True)) as server:
        yield server


def test_mtls_call_succeeds(mtls_server, pki):
    assert list(_propose(mtls_server.target, pki.client()).token_ids) == [7, 7]
    assert check(mtls_server.target, tls=pki.client()) == (True, f"{mtls_server.target}: SERVING")


@pytest.mark.parametrize("who", ["no client certificate", "a certificate from another CA", "plaintext"])
def test_callers_without_a_certificate_from_the_ca_are_refused(mtls_server, pki, who):
    tls = {"no client certificate": pki.client(with_cert=False), "a certificate from another CA": pki.rogue_client(),
           "plaintext": PLAINTEXT}[who]
    with pytest.raises(grpc.RpcError) as e:
        _propose(mtls_server.target, tls)
    assert e.value.code() is grpc.StatusCode.UNAVAILABLE, e.value.details()
    assert not check(mtls_server.target, tls=tls, timeout_s=2)[0]              # health is behind mTLS too


def test_a_client_does_not_trust_a_server_certificate_from_another_ca(mtls_server, pki):
    untrusting = TLSConfig(ca=pki.other_ca, cert=pki.cert, key=pki.key)
    with pytest.raises(grpc.RpcError) as e:
        _propose(mtls_server.target, untrusting)
    assert e.value.code() is grpc.StatusCode.UNAVAILABLE


def test_tls_without_client_certificates_serves_any_client_that_trusts_it(pki):
    with _host(pki.server(mutual=False)) as server:
        assert _propose(server.target, pki.client(with_cert=False)).token_ids == [7, 7]
        with pytest.raises(grpc.RpcError) as e:
            _propose(server.target, PLAINTEXT)                                    # plaintext to a TLS port
        assert e.value.code() is grpc.StatusCode.UNAVAILABLE


def test_the_expected_server_name_can_be_overridden(mtls_server, pki):
    wrong = TLSConfig(ca=pki.ca, cert=pki.cert, key=pki.key, server_name="not-in-the-certificate.example")
    with pytest.raises(grpc.RpcError):
        _propose(mtls_server.target, wrong)
    right = TLSConfig(ca=pki.ca, cert=pki.cert, key=pki.key, server_name="localhost")
    assert _propose(mtls_server.target, right).token_ids == [7, 7]


def test_the_plaintext_health_port_answers_health_and_nothing_else(pki):
    from common.distributed import free_port
    health_port = free_port()
    with _host(pki.server(mutual=True), health_port=health_port):
        assert check(f"127.0.0.1:{health_port}")[0]                               # what kubelet's grpc probe does
        with pytest.raises(grpc.RpcError) as e:
            _propose(f"127.0.0.1:{health_port}", PLAINTEXT)
        assert e.value.code() is grpc.StatusCode.UNIMPLEMENTED


def test_specd_health_takes_tls_flags(mtls_server, pki, capsys):
    target = mtls_server.target
    assert main(["health", target, "--tls-ca", pki.ca, "--tls-cert", pki.cert, "--tls-key", pki.key]) == 0
    assert main(["health", target, "--tls-ca", pki.ca, "--timeout", "2"]) == 1            # no client certificate
    assert main(["health", target, "--insecure", "--timeout", "2"]) == 1
    assert main(["health", target, "--insecure", "--tls-ca", pki.ca]) == 2                # contradictory
    out = capsys.readouterr()
    assert "SERVING" in out.out and "contradicts" in out.err


def test_plaintext_only_when_asked_for(pki, caplog):
    with pytest.raises(ConfigError, match="no TLS certificate.*--insecure"):
        TLSConfig().server_credentials("specd draft")
    with caplog.at_level("WARNING"):
        assert TLSConfig(insecure=True).server_credentials("specd draft") is None
    assert "PLAINTEXT" in caplog.text


@pytest.mark.parametrize("kwargs, message", [
    (dict(cert="a.crt"), "go together"),
    (dict(insecure=True, ca="ca.crt"), "contradicts"),
    (dict(cert="/nonexistent/tls.crt", key="/nonexistent/tls.key"), "cannot be read"),
    (dict(ca="/nonexistent/ca.crt"), "no TLS certificate"),
])
def test_bad_tls_settings_are_refused_with_a_clear_message(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        TLSConfig(**kwargs).check_server("specd draft")


def test_a_file_that_is_not_pem_is_refused(tmp_path, pki):
    junk = tmp_path / "junk.crt"
    junk.write_text("hello")
    with pytest.raises(ConfigError, match="not a PEM file"):
        TLSConfig(cert=str(junk), key=pki.key).check_server("x")


def test_empty_environment_values_mean_not_set():
    assert TLSConfig(cert="", key="", ca="", insecure=True).insecure          # SPECD_TLS_CERT= does not contradict


def test_a_service_without_certificates_or_insecure_refuses_to_start_before_loading_anything(tmp_path):
    env = {k: v for k, v in __import__("os").environ.items() if not k.startswith("SPECD_")}
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "scripts.cli", "draft", "--model", str(tmp_path / "no-such-model")],
                          capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == 2
    assert "no TLS certificate" in proc.stderr and "--insecure" in proc.stderr
    assert "Traceback" not in proc.stderr and "no-such-model" not in proc.stderr   # the model was never opened
    assert time.monotonic() - t0 < 30


@pytest.mark.parametrize("argv, message", [
    (["verifier", "--model", "X"], "no TLS certificate"),
    (["gateway"], "no TLS certificate"),
    (["draft", "--model", "X", "--insecure", "--tls-cert", "c", "--tls-key", "k"], "contradicts"),
])
def test_every_service_checks_its_tls_flags_first(argv, message, capsys, monkeypatch):
    for name in ("SPECD_INSECURE", "SPECD_TLS_CERT", "SPECD_TLS_KEY", "SPECD_TLS_CA"):
        monkeypatch.delenv(name, raising=False)
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_the_gateway_needs_upstream_tls_settings_or_an_explicit_plaintext(pki, capsys, monkeypatch):
    for name in ("SPECD_INSECURE", "SPECD_UPSTREAM_INSECURE", "SPECD_UPSTREAM_TLS_CA"):
        monkeypatch.delenv(name, raising=False)
    assert main(["gateway", "--tls-cert", pki.cert, "--tls-key", pki.key]) == 2
    assert "--upstream-tls-ca" in capsys.readouterr().err
    assert main(["gateway", "--tls-cert", pki.cert, "--tls-key", pki.key, "--upstream-insecure",
                 "--upstream-tls-ca", pki.ca]) == 2
    assert "contradicts" in capsys.readouterr().err
