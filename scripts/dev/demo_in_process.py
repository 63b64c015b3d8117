"""`specd demo` (in-process stage): the real Qwen2.5-Coder pair, target-only vs speculative, with timing."""
from __future__ import annotations

import time

from common.llm import LLM
from common.speculative.params import SamplingParams
from scripts.dev.demo_prompts import IN_PROCESS_PROMPTS


def run_demo(target: str, draft: str, dtype: str = "bfloat16", max_new_tokens: int = 96, tp_size: int = 1) -> None:
    t0 = time.perf_counter()
    print(f"loading target {target}\n    and draft {draft} ({dtype}, tp={tp_size}) …", flush=True)
    with LLM(target, draft, num_speculative_tokens="auto", dtype=dtype, tp_size=tp_size,
             kv_cache_memory_gib=0.5) as llm:
        print(f"loaded and calibrated in {time.perf_counter() - t0:.1f}s", flush=True)
        params = SamplingParams(max_tokens=max_new_tokens)
        for name, prompt, chat in IN_PROCESS_PROMPTS:
            print(f"\n=== {name} ===\n{prompt}", flush=True)
            timings = {}
            for label, proposer in (("target only", None), ("speculative (draft, K=auto)", "draft")):
                t = time.perf_counter()
                [out] = llm.generate([prompt], params, use_chat_template=chat, proposer=proposer)
                dt = time.perf_counter() - t
                timings[label] = (len(out.token_ids) / dt, out)
            (base_tps, base), (spec_tps, spec) = timings.values()
            print(f"--- completion ({len(spec.token_ids)} tokens, finish={spec.finish_reason}) ---\n{spec.text}")
            s = spec.stats
            print(f"--- target only: {base_tps:.1f} tokens/s | speculative: {spec_tps:.1f} tokens/s "
                  f"({spec_tps / base_tps:.2f}x), acceptance {s.acceptance_rate:.0%}, "
                  f"mean acceptance length {s.mean_acceptance_length:.2f}, mean K "
                  f"{sum(s.k_chosen) / max(1, len(s.k_chosen)):.1f}; identical output: "
                  f"{base.token_ids == spec.token_ids}")
