"""The real Qwen pair with the verifier's TP=2 across two "nodes" (two `specd verifier` processes on loopback, one
rank each, gloo over TCP): greedy output through the gateway equals in-process TP=1 target-only, in float32."""
import pytest

from common.distributed import free_port
from common.llm import LLM
from common.speculative.params import SamplingParams
from common.tokenizer import encode_prompt
from gateway.client import SpecdClient
from scripts.dev.topology import LocalTopology
from tests.memory_watch import release_memory

pytestmark = pytest.mark.real_model

PROMPTS = [("def fizzbuzz(n):\n", False), ("Write a Python function that merges two sorted lists.", True)]
MAX_TOKENS = 32


def _target_only(target: str) -> tuple[list[list[int]], list[list[int]]]:
    """The prompts' ids and their in-process TP=1 greedy output; the model is freed on return (no name keeps it)."""
    with LLM(target, dtype="float32", kv_cache_memory_gib=0.25) as llm:
        ids = [encode_prompt(llm.tokenizer, text, chat) for text, chat in PROMPTS]
        return ids, [o.token_ids for o in llm.generate(ids, SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True))]


def test_real_pair_with_tp2_across_two_nodes_equals_one_rank(real_models, tmp_path):
    target, draft = str(real_models["target"]), str(real_models["draft"])
    ids, expected = _target_only(target)
    release_memory()                                      # one copy of the target at a time
    env = {"SPECD_KV_CACHE_GIB": "0.125", "OMP_NUM_THREADS": "1"}    # a core per "node" on a 2-core machine
    with LocalTopology(target, draft, tp=2, nnodes=2, dtype="float32", ports=(free_port(), free_port(), free_port()),
                       k="auto", log_dir=tmp_path, extra_env=env, log_level="INFO") as topo:
        with SpecdClient(f"127.0.0.1:{topo.gateway_port}", timeout_s=300) as client:
            for prompt, exp in zip(ids, expected):
                reply = client.generate(prompt, max_tokens=MAX_TOKENS, ignore_eos=True)
                s = reply.stats
                print(f"two nodes: rounds={s.rounds} accepted={s.accepted}/{s.drafted}")
                assert list(reply.token_ids) == exp
                assert s.accepted > 0
    assert "tp=2 over 2 node(s)" in (tmp_path / "verifier.log").read_text()
    assert "worker node 1: ranks loaded" in (tmp_path / "verifier-node1.log").read_text()
