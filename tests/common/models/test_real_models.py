"""The real checkpoints (Qwen2.5-Coder 0.5B/1.5B, SmolLM2-135M) against transformers, in float32."""
import gc

import pytest
import torch

from common.config import EngineConfig
from common.engine.greedy import greedy_generate
from common.engine.model_runner import ModelRunner, SequenceChunk
from common.tokenizer import encode_prompt, load_tokenizer

pytestmark = pytest.mark.real_model

PROMPT = ("def merge_sort(items):\n    \"\"\"Sort a list with merge sort and return a new list.\"\"\"\n"
          "    if len(items) <= 1:\n        return items\n    middle = len(items) // 2\n"
          "    left = merge_sort(items[:middle])\n    right = merge_sort(items[middle:])\n"
          "    return merge(left, right)\n\n\ndef merge(left, right):\n")


def _hf(path):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


@pytest.mark.parametrize("role", ["target", "draft", "llama"])
def test_logits_match_transformers_over_64_tokens(role, real_models):
    path = real_models[role]
    ids = load_tokenizer(path).encode(PROMPT)[:64]
    assert len(ids) == 64
    hf = _hf(path)
    with torch.inference_mode():
        ref = hf(torch.tensor([ids])).logits[0].float()             # [64, vocab]
    del hf
    gc.collect()
    runner = ModelRunner(EngineConfig(model=str(path), kv_cache_memory_gib=0.25))
    # prefill 48, then a 1-token decode, then a 15-token extend: every path of the forward pass
    got = torch.cat(runner.forward([SequenceChunk(0, ids[:48], num_logits=48)]).logits
                    + runner.forward([SequenceChunk(0, ids[48:49])]).logits
                    + runner.forward([SequenceChunk(0, ids[49:], num_logits=15)]).logits)
    diff = (got - ref).abs().max().item()
    assert diff <= 1e-3, f"{role}: max |Δlogits| = {diff}"
    del runner
    gc.collect()


def test_greedy_32_tokens_equal_transformers_generate(real_models):
    path = real_models["target"]
    tok = load_tokenizer(path)
    prompts = [encode_prompt(tok, "def is_prime(n: int) -> bool:\n", chat=False),
               encode_prompt(tok, "Explain what a hash map is in two sentences.", chat=True)]
    hf = _hf(path)
    expected = []
    with torch.inference_mode():
        for ids in prompts:
            out = hf.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=32, min_new_tokens=32,
                              pad_token_id=tok.eos_token_id)
            expected.append(out[0, len(ids):].tolist())
    del hf
    gc.collect()
    runner = ModelRunner(EngineConfig(model=str(path), kv_cache_memory_gib=0.25))
    got = greedy_generate(runner, prompts, max_new_tokens=32)       # both prompts in one batch
    assert [r.token_ids for r in got] == expected
