"""The three real services with TLS on every hop (tiny checkpoints, loopback): mTLS between the gateway and the
draft/verifier, TLS and an API key at the gateway. Greedy output equals the in-process target's, which is what the
plaintext topology returns (test_e2e.py); callers without the right certificate or key are refused."""
import secrets
import ssl

import grpc
import openai
import pytest

from scripts.cli import main
from common.distributed import free_port
from common.llm import LLM
from common.rpc.generated.specd.v1 import common_pb2, verifier_pb2_grpc
from common.rpc.tls import PLAINTEXT, sync_channel
from common.speculative.params import SamplingParams
from gateway.client import SpecdClient
from scripts.dev.topology import LocalTopology
from tests.certs import write_pki
from tests.checkpoints import build_model_folder, perturbed_copy
from tests.grpc_status import status_of

PROMPT = [5, 9, 2, 77, 31]
MAX_TOKENS = 16


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("secure-e2e")
    target = build_model_folder(root / "target", seed=21)
    return str(target), str(perturbed_copy(target, root / "draft", noise=0.05))


def test_all_tls_topology_generates_the_target_output_and_refuses_strangers(models, tmp_path, capsys):
    pki = write_pki(tmp_path / "pki")
    key = "sk-e2e-" + secrets.token_hex(16)
    with LLM(models[0], models[1], num_speculative_tokens=3, dtype="float32", kv_cache_memory_gib=0.05) as twin:
        [expected] = twin.generate([PROMPT], SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True), proposer=None)
    twin_text = expected.text
    logs = tmp_path / "logs"
    logs.mkdir()
    ports = (free_port(), free_port(), free_port())
    http_port = free_port()
    topo = LocalTopology(models[0], models[1], tp=1, dtype="float32", ports=ports, k="3", log_dir=logs,
                         tls=pki.server(mutual=True), api_keys=[key], log_level="DEBUG", http_port=http_port)
    gateway, draft, verifier = (f"127.0.0.1:{p}" for p in ports)
    try:
        topo.start(timeout_s=180)
        with SpecdClient(gateway, timeout_s=120, tls=pki.client(with_cert=False), api_key=key) as client:
            reply = client.generate(PROMPT, max_tokens=MAX_TOKENS, ignore_eos=True)
            assert list(reply.token_ids) == expected.token_ids
            assert reply.stats.drafted > 0 and reply.stats.fallback_rounds == 0      # the draft answered over mTLS
        # The HTTP door serves the same certificate and wants the same key.
        ca = ssl.create_default_context(cafile=pki.ca)
        with openai.OpenAI(base_url=f"https://127.0.0.1:{http_port}/v1", api_key=key, max_retries=0,
                           http_client=openai.DefaultHttpxClient(verify=ca)) as https:
            r = https.completions.create(model="target", prompt=PROMPT, max_tokens=MAX_TOKENS, temperature=0,
                                         extra_body={"ignore_eos": True})
            assert r.choices[0].text == twin_text
        with openai.OpenAI(base_url=f"https://127.0.0.1:{http_port}/v1", api_key="sk-wrong-" + "0" * 16,
                           max_retries=0, http_client=openai.DefaultHttpxClient(verify=ca)) as wrong:
            with pytest.raises(openai.AuthenticationError):
                wrong.models.list()
        with openai.OpenAI(base_url=f"http://127.0.0.1:{http_port}/v1", api_key=key, max_retries=0) as plain:
            with pytest.raises(openai.APIConnectionError):          # plaintext to the TLS port gets nowhere
                plain.models.list()
        with SpecdClient(gateway, timeout_s=30, tls=pki.client(with_cert=False)) as no_key:
            assert status_of(lambda: no_key.generate(PROMPT, max_tokens=2)) is grpc.StatusCode.UNAUTHENTICATED
        with SpecdClient(gateway, timeout_s=30, api_key=key) as plaintext:
            assert status_of(lambda: plaintext.generate(PROMPT, max_tokens=2)) is grpc.StatusCode.UNAVAILABLE

        # Only a holder of a certificate from the CA (the gateway) reaches the model services.
        refused = grpc.StatusCode.UNAVAILABLE
        for tls, want in ((pki.client(), grpc.StatusCode.OK), (pki.client(with_cert=False), refused),
                          (pki.rogue_client(), refused), (PLAINTEXT, refused)):
            with sync_channel(verifier, tls) as channel:
                stub = verifier_pb2_grpc.VerifierServiceStub(channel)
                assert status_of(lambda: stub.Info(common_pb2.InfoRequest(), timeout=10)) is want

        flags = ["--tls-ca", pki.ca, "--tls-cert", pki.cert, "--tls-key", pki.key]
        for target in (gateway, draft, verifier):
            assert main(["health", target, *flags]) == 0, target
        assert main(["health", gateway, "--tls-ca", pki.ca]) == 0        # the gateway does not ask for certificates
        assert main(["health", draft, "--tls-ca", pki.ca, "--timeout", "2"]) == 1
    finally:
        topo.stop()
    assert "SERVING" in capsys.readouterr().out
    texts = {name: (logs / f"{name}.log").read_text() for name in ("gateway", "draft", "verifier")}
    assert "mTLS (client certificates required)" in texts["verifier"] and "mTLS" in texts["draft"]
    assert "API key(s)" in texts["gateway"] and "PLAINTEXT" not in "".join(texts.values())
    for name, text in texts.items():
        assert key not in text, f"the API key leaked into the {name} log"
