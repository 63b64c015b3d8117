"""KV-aware admission through the real topology (verifier TP=1, draft and gateway as processes, tiny checkpoints):
32 concurrent requests whose prompts need 3× the verifier's KV cache all complete (sessions wait, are preempted
and re-prefilled by the gateway), each equal to its in-process twin (target-only when greedy, the same draft when
seeded), and the verifier ends with no session and no KV block held."""
import concurrent.futures as cf
import random

import pytest

from common.distributed import free_port
from common.llm import LLM
from common.speculative.params import SamplingParams
from gateway.client import SpecdClient
from scripts.dev.topology import LocalTopology
from tests.checkpoints import build_model_folder, perturbed_copy
from tests.reliability import idle_state, scrape, wait_for_state

NUM_BLOCKS, BLOCK, MAX_TOKENS = 48, 16, 16
# Tiny checkpoint (tests/checkpoints.py): 2 layers, 2 KV heads of 16, float32: K and V of one 16-token block.
BLOCK_BYTES = 2 * 2 * BLOCK * 2 * 16 * 4


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("kv-e2e")
    target = build_model_folder(root / "target", seed=21)
    return str(target), str(perturbed_copy(target, root / "draft", noise=0.05))


@pytest.fixture(scope="module")
def topo(models, tmp_path_factory):
    t = LocalTopology(models[0], models[1], tp=1, dtype="float32", ports=(free_port(), free_port(), free_port()),
                      k="3", log_dir=tmp_path_factory.mktemp("logs"), log_level="INFO")
    t.metrics_port = free_port()
    t.service_env["verifier"] = {"SPECD_KV_CACHE_GIB": repr(NUM_BLOCKS * BLOCK_BYTES / 2**30),
                                 "SPECD_METRICS_PORT": str(t.metrics_port)}
    t.start(timeout_s=180)
    yield t
    t.stop()


def test_traffic_three_times_the_cache_completes_exactly_through_the_gateway(topo, models):
    rng = random.Random(3)
    prompts = [[rng.randrange(1, 128) for _ in range(rng.randint(40, 110))] for _ in range(32)]
    assert sum(-(-len(p) // BLOCK) for p in prompts) >= 3 * NUM_BLOCKS
    # Every other request samples (seeded): a re-prefilled session keeps its round counter, so it draws the same.
    params = [SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True) if i % 2 else
              SamplingParams(temperature=1.0, top_p=0.9, seed=i, max_tokens=MAX_TOKENS, ignore_eos=True)
              for i in range(len(prompts))]
    with LLM(models[0], models[1], num_speculative_tokens=3, dtype="float32", kv_cache_memory_gib=0.05) as llm:
        expected = [llm.generate([p], sp, proposer=None if sp.greedy else "draft")[0].token_ids
                    for p, sp in zip(prompts, params)]
    assert scrape(topo.metrics_port)["specd_kv_blocks_free"] == NUM_BLOCKS

    def generate(p, sp):
        sampled = {} if sp.greedy else dict(temperature=1.0, top_p=0.9, seed=sp.seed, num_speculative_tokens=3)
        return client.generate(p, max_tokens=MAX_TOKENS, ignore_eos=True, **sampled)
    with SpecdClient(f"127.0.0.1:{topo.gateway_port}", timeout_s=120) as client, \
            cf.ThreadPoolExecutor(32) as pool:
        replies = list(pool.map(generate, prompts, params))
    assert [list(r.token_ids) for r in replies] == expected
    assert max(r.stats.max_verify_batch_size for r in replies) > 1
    idle = {"specd_kv_blocks_used": 0, "specd_verifier_sessions": 0, "specd_verifier_queue_depth": 0,
            "specd_requests_in_flight": 0}
    wait_for_state(lambda: idle_state(scrape(topo.metrics_port)), idle, 10, "verifier back to idle")
    assert scrape(topo.metrics_port)["specd_kv_blocks_free"] == NUM_BLOCKS
    assert "preempted" in (topo.log_dir / "verifier.log").read_text()        # the cache really ran out
