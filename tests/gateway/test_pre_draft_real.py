"""Pre-drafting on the real Qwen pair through the three services (float32, verifier TP=1): greedy output equals
in-process target-only with the gateway dialling the services directly and through a delay proxy (a WAN of 5 ms
each way), and a seeded sampled request gives the same tokens with pre-drafting on and off (at a fixed K). Each
gateway's own metrics show that pre-drafted rounds were used (a test that never hit would prove nothing)."""
import pytest

from bench.delay_proxy import DelayProxy, Route
from common.distributed import free_port
from common.llm import LLM
from common.speculative.params import SamplingParams
from common.tokenizer import encode_prompt
from gateway.client import SpecdClient
from scripts.dev.metrics_scrape import scrape_by_label
from scripts.dev.topology import LocalTopology
from tests.memory_watch import release_memory

pytestmark = pytest.mark.real_model

PROMPTS = [("def fizzbuzz(n):\n", False),
           ("Write a Python function that merges two sorted lists.", True)]
MAX_TOKENS = 48
GATEWAYS = {"gateway": ("on", False), "gateway-wan": ("on", True), "gateway-off": ("off", False)}


def _target_only(target: str) -> tuple[list[list[int]], list[list[int]]]:
    with LLM(target, dtype="float32", kv_cache_memory_gib=0.25) as llm:
        ids = [encode_prompt(llm.tokenizer, text, chat) for text, chat in PROMPTS]
        return ids, [o.token_ids for o in llm.generate(ids, SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True))]


def _hits(port: int) -> float:
    return scrape_by_label(port, "specd_pre_drafts_total", "outcome").get("hit", 0.0)


@pytest.fixture(scope="module")
def expected(real_models):
    out = _target_only(str(real_models["target"]))
    release_memory()                                  # the in-process model is gone before the services load
    return out


@pytest.fixture(scope="module")
def topo(real_models, expected, tmp_path_factory):
    logs = tmp_path_factory.mktemp("pre_draft_real")
    t = LocalTopology(str(real_models["target"]), str(real_models["draft"]), tp=1, dtype="float32",
                      ports=(free_port(), free_port(), free_port()), k="auto", log_dir=logs,
                      extra_env={"SPECD_KV_CACHE_GIB": "0.125"})
    proxy = DelayProxy([Route(0, "127.0.0.1", t.verifier_port), Route(0, "127.0.0.1", t.draft_port)],
                       delay_s=0.005).start()
    t.ports_of = {}                                   # gateway name -> (gRPC port, metrics port)
    try:
        t.start_verifier()
        t.start_draft()
        t.wait_serving(f"127.0.0.1:{t.verifier_port}", "verifier", 600)
        t.wait_serving(f"127.0.0.1:{t.draft_port}", "draft", 600)
        for name, (pre_draft, wan) in GATEWAYS.items():
            port, metrics_port = free_port(), free_port()
            t.service_env[name] = {"SPECD_METRICS_PORT": str(metrics_port)}
            upstream = (f"127.0.0.1:{proxy.routes[0].port}", f"127.0.0.1:{proxy.routes[1].port}") if wan else None
            t.start_gateway(name, port=port, http_port=0, extra_args=("--pre-draft", pre_draft), upstream=upstream)
            t.wait_serving(f"127.0.0.1:{port}", name, 120)
            t.ports_of[name] = (port, metrics_port)
        yield t
    finally:
        t.stop()
        proxy.stop()


@pytest.mark.parametrize("name", ["gateway", "gateway-wan"])
def test_greedy_with_pre_drafting_equals_target_only(topo, expected, name):
    ids, outputs = expected
    port, metrics_port = topo.ports_of[name]
    before = _hits(metrics_port)
    with SpecdClient(f"127.0.0.1:{port}") as client:
        for prompt, exp in zip(ids, outputs):
            reply = client.generate(prompt, max_tokens=MAX_TOKENS, ignore_eos=True)
            s = reply.stats
            print(f"{name}: rounds={s.rounds} accepted={s.accepted}/{s.drafted}")
            assert list(reply.token_ids) == exp
    hits = _hits(metrics_port) - before
    print(f"{name}: {hits:.0f} pre-drafted rounds used")
    assert hits > 0


def test_a_seeded_sampled_request_is_the_same_with_pre_drafting_on_and_off(topo, expected):
    """At a fixed K: a sample depends on the K schedule (round boundaries decide which draw is which), and K=auto
    follows measured costs, which pre-drafting changes; what must not change the sample is when a draft was made."""
    ids, _ = expected
    outputs = {}
    for name in ("gateway", "gateway-off"):
        port, metrics_port = topo.ports_of[name]
        before = _hits(metrics_port)
        with SpecdClient(f"127.0.0.1:{port}") as client:
            outputs[name] = [list(client.generate(prompt, max_tokens=MAX_TOKENS, ignore_eos=True, temperature=0.7,
                                                  seed=1234 + i, num_speculative_tokens=3).token_ids)
                             for i, prompt in enumerate(ids)]
        hits = _hits(metrics_port) - before
        print(f"{name}: {hits:.0f} pre-drafted rounds used")
        assert hits == 0 if name == "gateway-off" else hits > 0
    assert outputs["gateway"] == outputs["gateway-off"]
