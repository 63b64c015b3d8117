"""On the real Qwen pair (fp32): speculative logprobs (draft model, K = 4 and auto) equal target-only ones within
1e-4, greedy and seeded sampling with penalties. Short on purpose: two prompts, 32 tokens."""
import pytest

from common.llm import LLM
from common.speculative.params import SamplingParams
from common.tokenizer import encode_prompt
from tests.common.speculative.reference import assert_logprobs_match, assert_same_logprobs, teacher_forced

pytestmark = pytest.mark.real_model

PROMPTS = [("def fibonacci(n):\n", False), ("Name three uses of a hash map.", True)]
TOP = 5


@pytest.fixture(scope="module")
def llm(real_models):
    with LLM(str(real_models["target"]), str(real_models["draft"]), num_speculative_tokens=4, dtype="float32",
             kv_cache_memory_gib=0.5) as llm:
        yield llm


@pytest.fixture(scope="module")
def prompt_ids(llm):
    return [encode_prompt(llm.tokenizer, text, chat) for text, chat in PROMPTS]


def test_greedy_speculative_logprobs_equal_target_only(llm, prompt_ids):
    params = SamplingParams(max_tokens=32, ignore_eos=True, logprobs=TOP)
    expected = llm.generate(prompt_ids, params, proposer=None)
    for k in (4, "auto"):
        outs = llm.generate(prompt_ids, params, num_speculative_tokens=k)
        if k == 4:
            assert sum(o.stats.accepted for o in outs) > 0
        for out, ref in zip(outs, expected):
            assert out.token_ids == ref.token_ids, f"K={k}"
            assert_same_logprobs(out.logprobs, ref.logprobs)


def test_sampled_penalised_logprobs_are_the_targets_own(llm, prompt_ids):
    params = SamplingParams(temperature=0.8, top_p=0.95, seed=3, max_tokens=32, ignore_eos=True, logprobs=TOP,
                            presence_penalty=0.5, frequency_penalty=0.3, repetition_penalty=1.1)
    outs = llm.generate(prompt_ids, params, num_speculative_tokens=4)
    assert sum(o.stats.accepted for o in outs) > 0
    for prompt, out in zip(prompt_ids, outs):
        assert_logprobs_match(out, teacher_forced(llm, prompt, out.token_ids, params), TOP)
