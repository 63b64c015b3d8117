"""Greedy speculative output equals target-only greedy output, token for token, on the real Qwen pair: in float32,
and in bfloat16 with batch-invariant numerics (without them bf16 near-ties flip: test_batch_invariant_real.py)."""
import pytest

from common.llm import LLM
from common.speculative.params import SamplingParams

pytestmark = pytest.mark.real_model

# (prompt, use the chat template)
PROMPTS = [
    ("def binary_search(items, target):\n    \"\"\"Return the index of target in sorted items, or -1.\"\"\"\n", False),
    ("import json\n\n\ndef load_config(path):\n", False),
    ("Write a Python function that reverses a linked list.", True),
    ("What does the `yield` keyword do in Python?", True),
    ("The old harbour town woke slowly. Fishermen", False),
    ("Summarise the causes of the French Revolution in a short paragraph.", True),
]
MAX_TOKENS = 64


@pytest.fixture(scope="module", params=["float32", "bfloat16-invariant"])
def llm(real_models, request):
    # float32: batched verification and one-token decoding agree to ~1e-5, far below real logit gaps.
    # bfloat16 with batch_invariant: they agree bit for bit.
    dtype = request.param.split("-")[0]
    with LLM(str(real_models["target"]), str(real_models["draft"]), num_speculative_tokens="auto",
             dtype=dtype, kv_cache_memory_gib=0.5, batch_invariant=request.param.endswith("invariant")) as llm:
        yield llm


@pytest.fixture(scope="module")
def prompt_ids(llm):
    from common.tokenizer import encode_prompt
    return [encode_prompt(llm.tokenizer, text, chat) for text, chat in PROMPTS]


@pytest.fixture(scope="module")
def target_only(llm, prompt_ids):
    outs = llm.generate(prompt_ids, SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True), proposer=None)
    return [o.token_ids for o in outs]


# The edges of K (1 and k_max), the adaptive controller, and the n-gram proposer. The full 2 x 4 matrix cost
# ~5 minutes of the CI budget; middle K values are covered on tiny models in tests/common/test_llm.py.
@pytest.mark.parametrize("proposer,k", [("draft", 1), ("draft", 8), ("draft", "auto"), ("ngram", 4)])
def test_greedy_speculative_equals_target_only(llm, prompt_ids, target_only, proposer, k):
    outs = llm.generate(prompt_ids, SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True),
                        num_speculative_tokens=k, proposer=proposer)
    for i, (out, expected) in enumerate(zip(outs, target_only)):
        assert out.token_ids == expected, f"prompt {i} ({PROMPTS[i][0][:30]!r}) diverged, K={k}, {proposer}"
    drafted = sum(o.stats.drafted for o in outs)
    accepted = sum(o.stats.accepted for o in outs)
    print(f"{proposer} K={k}: acceptance {accepted}/{drafted}, mean acceptance length "
          f"{sum(o.stats.mean_acceptance_length for o in outs) / len(outs):.2f}")
    if proposer == "draft":
        assert drafted > 0 and accepted > 0          # speculation really happened, and the draft is useful
