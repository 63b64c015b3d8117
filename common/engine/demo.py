"""`specd demo` (engine stage): greedy generation on the real target model, with timing."""
from __future__ import annotations

import time

import torch

from common.config import EngineConfig
from common.engine.greedy import greedy_generate
from common.engine.tp_executor import TPExecutor
from common.tokenizer import encode_prompt, load_tokenizer, stop_token_ids

DEMO_PROMPTS = [
    ("code", "def quicksort(arr):\n    \"\"\"Sort a list with quicksort.\"\"\"\n", False),
    ("chat", "Write a Python function that checks whether a string is a palindrome.", True),
]


def run_demo(model_path: str, dtype: str = "bfloat16", max_new_tokens: int = 64, tp_size: int = 1) -> None:
    torch.set_num_threads(max(1, torch.get_num_threads()))
    t0 = time.perf_counter()
    tokenizer = load_tokenizer(model_path)
    executor = TPExecutor(EngineConfig(model=model_path, dtype=dtype, tp_size=tp_size, kv_cache_memory_gib=0.5))
    print(f"loaded {model_path} ({dtype}, tp={tp_size}) in {time.perf_counter() - t0:.1f}s", flush=True)
    eos = stop_token_ids(tokenizer, executor.model_config.eos_token_ids)
    try:
        for name, prompt, chat in DEMO_PROMPTS:
            ids = encode_prompt(tokenizer, prompt, chat)
            t = time.perf_counter()
            [res] = greedy_generate(executor, [ids], max_new_tokens, eos,
                                    on_step=lambda s: print(".", end="", flush=True) if s % 8 == 0 else None)
            dt = time.perf_counter() - t
            n = len(res.token_ids)
            print(f"\n--- {name} prompt ({len(ids)} tokens) ---\n{prompt}")
            print(f"--- completion ({n} tokens, {n / dt:.1f} tokens/s, finish={res.finish_reason}) ---")
            print(tokenizer.decode(res.token_ids, skip_special_tokens=True))
    finally:
        executor.shutdown()
