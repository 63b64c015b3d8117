"""Per-tenant prefix-cache namespaces through the gateway: each API key's calls carry its key id as their cache
namespace, so one key's prompt never hits (or reports) blocks another key published; the cached-token count goes
back to clients only where the operator allows it. A loopback gateway (auth interceptor + the real servicer and
RoundRunner) over fake draft and verifier stubs whose verifier keeps a prefix cache per namespace."""
import grpc
import pytest

from common.rpc.generated.specd.v1 import gateway_pb2, gateway_pb2_grpc
from common.speculative.adaptive_k import CostModel
from gateway.auth import ApiKeyAuth, ApiKeyInterceptor, RateLimit, key_id
from gateway.main import report_cached_tokens
from gateway.rounds import RoundRunner, RoundSettings
from gateway.generation import Generator
from gateway.servicer import GatewayServicer
from scripts.cli import build_parser
from tests.common.rpc.loopback import BackgroundServer
from tests.gateway.fake_stubs import FINGERPRINT, VOCAB, FakeDraft, FakeVerifier

KEY_1 = "sk-test-0123456789abcdef-alpha"
KEY_2 = "sk-test-0123456789abcdef-bravo"
BLOCK = 4
PROMPT = [3, 9, 4, 1, 7, 7, 2, 8, 5, 6]                 # 2 full blocks + 2 tokens


class CachingVerifier(FakeVerifier):
    """FakeVerifier plus a prefix cache of full blocks per cache_namespace, as the real model runner keeps one: a
    new session's leading blocks hit only what a session of the same namespace committed."""

    def __init__(self):
        super().__init__()
        self.published: dict[str, set[tuple[int, ...]]] = {}
        self.hits: list[tuple[str, int]] = []           # (namespace, cached tokens) of every new session

    async def Verify(self, req, timeout):
        new_session = req.session_id not in self.sessions and len(req.new_tokens) == req.committed_len
        cached = 0
        if new_session:
            tokens, known = list(req.new_tokens), self.published.get(req.cache_namespace, set())
            while cached + BLOCK < len(tokens) and tuple(tokens[:cached + BLOCK]) in known:
                cached += BLOCK
            self.hits.append((req.cache_namespace, cached))
        reply = await super().Verify(req, timeout)
        reply.cached_tokens = cached
        held = self.sessions[req.session_id].tokens
        self.published.setdefault(req.cache_namespace, set()).update(
            tuple(held[:n]) for n in range(BLOCK, len(held) + 1, BLOCK))
        return reply


class IdsTokenizer:
    def decode(self, ids, skip_special_tokens=True):
        return " ".join(map(str, ids))


def _gateway(verifier, draft, **servicer_kw) -> BackgroundServer:
    generator_kw = {k: servicer_kw.pop(k) for k in ("tenant_prefix_cache",) if k in servicer_kw}

    async def build():
        rounds = RoundRunner(verifier, draft, frozenset(), 4096, RoundSettings(), CostModel(), fingerprint=FINGERPRINT)
        server = grpc.aio.server(interceptors=[ApiKeyInterceptor(ApiKeyAuth([KEY_1, KEY_2], RateLimit(0)))])
        gateway_pb2_grpc.add_GatewayServicer_to_server(
            GatewayServicer(Generator(rounds, IdsTokenizer(), 2, 8, VOCAB, **generator_kw), **servicer_kw), server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        return server, port
    return BackgroundServer(build)


def _generate(target, key, stream=False) -> gateway_pb2.SpecStats:
    req = gateway_pb2.GenerateRequest(prompt_token_ids=gateway_pb2.TokenIds(ids=PROMPT), max_tokens=6)
    metadata = (("authorization", f"Bearer {key}"),)
    with grpc.insecure_channel(target) as channel:
        stub = gateway_pb2_grpc.GatewayStub(channel)
        if stream:
            return list(stub.GenerateStream(req, timeout=10, metadata=metadata))[-1].stats
        return stub.Generate(req, timeout=10, metadata=metadata).stats


@pytest.mark.parametrize("stream", [False, True])
def test_one_keys_prefix_is_a_miss_for_another_key_and_a_hit_for_itself(stream):
    verifier, draft = CachingVerifier(), FakeDraft()
    with _gateway(verifier, draft, tenant_prefix_cache=True, report_cached_tokens=True) as gw:
        first = _generate(gw.target, KEY_1, stream)
        other = _generate(gw.target, KEY_2, stream)
        again = _generate(gw.target, KEY_1, stream)
    id_1, id_2 = key_id(KEY_1), key_id(KEY_2)
    assert verifier.hits == [(id_1, 0), (id_2, 0), (id_1, 2 * BLOCK)]
    assert (first.prefix_cached_tokens, other.prefix_cached_tokens, again.prefix_cached_tokens) == (0, 0, 2 * BLOCK)
    assert {r.cache_namespace for r in verifier.requests} == {id_1, id_2}     # every call, not only the first
    assert {r.cache_namespace for r in draft.requests} == {id_1, id_2}


def test_a_shared_prefix_cache_lets_every_key_hit():
    verifier = CachingVerifier()
    with _gateway(verifier, FakeDraft(), tenant_prefix_cache=False, report_cached_tokens=True) as gw:
        _generate(gw.target, KEY_1)
        other = _generate(gw.target, KEY_2)
    assert verifier.hits == [("", 0), ("", 2 * BLOCK)]
    assert other.prefix_cached_tokens == 2 * BLOCK


def test_cached_tokens_are_not_reported_unless_allowed():
    verifier = CachingVerifier()
    with _gateway(verifier, FakeDraft(), tenant_prefix_cache=True, report_cached_tokens=False) as gw:
        _generate(gw.target, KEY_1)
        again = _generate(gw.target, KEY_1)
        streamed = _generate(gw.target, KEY_1, stream=True)
    assert verifier.hits[1:] == [(key_id(KEY_1), 2 * BLOCK)] * 2       # the verifier hit ...
    assert again.prefix_cached_tokens == 0 and streamed.prefix_cached_tokens == 0    # ... the client is not told


def test_report_flag_defaults_off_with_api_keys_and_on_without(monkeypatch):
    monkeypatch.delenv("SPECD_REPORT_CACHED_TOKENS", raising=False)
    monkeypatch.delenv("SPECD_SHARED_PREFIX_CACHE", raising=False)
    args = build_parser().parse_args(["gateway", "--insecure"])
    assert not args.shared_prefix_cache
    assert report_cached_tokens(args, keys_configured=True) is False
    assert report_cached_tokens(args, keys_configured=False) is True
    for value, expected in (("on", True), ("off", False)):
        args = build_parser().parse_args(["gateway", "--insecure", "--report-cached-tokens", value])
        assert report_cached_tokens(args, keys_configured=True) is expected
    assert build_parser().parse_args(["gateway", "--insecure", "--shared-prefix-cache"]).shared_prefix_cache
