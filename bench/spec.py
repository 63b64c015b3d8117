"""`make bench-spec`: speculative decoding on the real Qwen2.5-Coder 0.5B→1.5B pair, greedy, batch 1.

Side by side in one process, interleaved per prompt and repetition: transformers target-only `generate`,
transformers assisted generation (`assistant_model=draft`), ours target-only, ours with the draft at K=4 and
K=auto, ours with n-gram lookup. Every system generates exactly `--max-tokens` tokens (EOS ignored).
The analytic bound is the ideal speedup over our own target-only decoding, E(α, K) / (1 + K·c), with α the
per-token acceptance probability measured in the run (accepted / (accepted + rejections)) and c the measured
cost of one draft step relative to one target decoding step.
"""
from __future__ import annotations

import statistics
import sys
import time

import torch

from bench.prompts import PROMPTS
from bench.report import bench_arguments, fetched_pair, goal, print_goals, print_table, write_result

SYSTEMS = ["hf target-only", "hf assisted", "ours target-only", "ours draft K=4", "ours draft K=auto",
           "ours ngram K=auto"]


def expected_tokens(alpha: float, k: int) -> float:
    return float(k + 1) if alpha >= 1 else (1 - alpha ** (k + 1)) / (1 - alpha)


def main(argv=None) -> int:
    args = bench_arguments(__doc__, "spec", prompts=len(PROMPTS)).parse_args(argv)

    from transformers import AutoModelForCausalLM
    from common.llm import LLM
    from common.speculative.params import SamplingParams
    from common.tokenizer import encode_prompt
    pair = fetched_pair("bench-spec")
    if pair is None:
        return 2
    target, draft = pair
    dtype = getattr(torch, args.dtype)
    t0 = time.perf_counter()
    hf_target = AutoModelForCausalLM.from_pretrained(target, dtype=dtype).eval()
    hf_draft = AutoModelForCausalLM.from_pretrained(draft, dtype=dtype).eval()
    llm = LLM(target, draft, num_speculative_tokens="auto", dtype=args.dtype, kv_cache_memory_gib=0.5)
    print(f"loaded 4 models in {time.perf_counter() - t0:.0f}s", flush=True)
    prompts = PROMPTS[:args.prompts]
    ids = [encode_prompt(llm.tokenizer, text, chat) for _, _, text, chat in prompts]
    pad = llm.tokenizer.eos_token_id
    n = args.max_tokens
    greedy = SamplingParams(max_tokens=n, ignore_eos=True)

    def run(system: str, prompt_ids: list[int]):
        t = time.perf_counter()
        stats = None
        if system.startswith("hf"):
            extra = {"assistant_model": hf_draft} if system == "hf assisted" else {}
            with torch.inference_mode():
                out = hf_target.generate(torch.tensor([prompt_ids]), do_sample=False, max_new_tokens=n,
                                         min_new_tokens=n, pad_token_id=pad, **extra)
            tokens = out[0, len(prompt_ids):].tolist()
        else:
            proposer = None if system == "ours target-only" else ("ngram" if "ngram" in system else "draft")
            k = 0 if proposer is None else ("auto" if system.endswith("auto") else 4)
            [res] = llm.generate([prompt_ids], greedy, num_speculative_tokens=k, proposer=proposer)
            tokens, stats = res.token_ids, res.stats
        return time.perf_counter() - t, tokens, stats

    for system in SYSTEMS:                                            # warm-up
        run(system, ids[0][:8])
    times = {(s, i): [] for s in SYSTEMS for i in range(len(prompts))}
    stats = {(s, i): [] for s in SYSTEMS for i in range(len(prompts))}
    outputs = {}
    for rep in range(args.reps):
        for i, prompt_ids in enumerate(ids):
            for s in SYSTEMS:
                dt, tokens, st = run(s, prompt_ids)
                times[(s, i)].append(dt)
                stats[(s, i)].append(st)
                outputs.setdefault((s, i), tokens)
            line = "  ".join(f"{s}: {n / times[(s, i)][-1]:.2f}" for s in SYSTEMS)
            print(f"rep {rep + 1}/{args.reps} prompt {prompts[i][0]}: {line} tokens/s", flush=True)

    def tps(s, i):
        return n / statistics.median(times[(s, i)])

    def agg(s, idx):
        return len(idx) * n / sum(statistics.median(times[(s, i)]) for i in idx)

    all_idx = list(range(len(prompts)))
    code_idx = [i for i, p in enumerate(prompts) if p[1] == "code"]
    base_tps = {i: tps("ours target-only", i) for i in all_idx}
    t_target_step = statistics.median(statistics.median(times[("ours target-only", i)]) / n for i in all_idx)
    rows, per_prompt = [], []
    for s in SYSTEMS:
        row = {"system": s, "tokens_per_s": agg(s, all_idx), "tokens_per_s_code": agg(s, code_idx),
               "speedup_vs_hf_target_only": agg(s, all_idx) / agg("hf target-only", all_idx),
               "speedup_vs_hf_target_only_code": agg(s, code_idx) / agg("hf target-only", code_idx),
               "min_ratio_vs_ours_target_only": min(tps(s, i) / base_tps[i] for i in all_idx),
               "same_tokens_as_target_only": all(outputs[(s, i)] == outputs[("ours target-only", i)]
                                                 for i in all_idx)}
        sts = [st for i in all_idx for st in stats[(s, i)] if st is not None]
        if sts and sum(st.drafted for st in sts):
            accepted = sum(st.accepted for st in sts)
            rounds = sum(st.rounds for st in sts)
            rejections = sum(1 for st in sts for k, a in zip(st.k_chosen, st.per_round_accepted) if a < k)
            alpha = accepted / (accepted + rejections) if accepted + rejections else 0.0
            t_draft_step = sum(st.draft_s for st in sts) / max(1, sum(sum(st.k_chosen) for st in sts))
            c = t_draft_step / t_target_step if "ngram" not in s else 0.0
            ks = [k for st in sts for k in st.k_chosen]
            if s.endswith("K=4"):
                bound = expected_tokens(alpha, 4) / (1 + 4 * c)
            else:
                bound = max(expected_tokens(alpha, k) / (1 + k * c) for k in range(0, llm.k_max + 1))
            achieved = agg(s, all_idx) / agg("ours target-only", all_idx)
            positions = max(len(st.accepted_per_position) for st in sts)
            per_pos = []
            for j in range(positions):
                a = sum(st.accepted_per_position[j] for st in sts if len(st.accepted_per_position) > j)
                d = sum(st.drafted_per_position[j] for st in sts if len(st.drafted_per_position) > j)
                per_pos.append(round(a / d, 3) if d else None)
            row.update({"acceptance_rate": accepted / sum(st.drafted for st in sts), "alpha": alpha,
                        "mean_acceptance_length": 1 + accepted / rounds, "cost_ratio_c": c,
                        "mean_k": sum(ks) / len(ks), "analytic_bound": bound, "achieved_speedup": achieved,
                        "fraction_of_bound": achieved / bound, "acceptance_per_position": per_pos})
        rows.append(row)
    for i, p in enumerate(prompts):
        per_prompt.append({"prompt": p[0], "kind": p[1], "prompt_tokens": len(ids[i]),
                           **{s: round(tps(s, i), 3) for s in SYSTEMS}})

    print()
    print_table(rows, [("system", "system", "s"), ("tokens_per_s", "tok/s", ".2f"),
                       ("speedup_vs_hf_target_only", "vs HF", ".2f"),
                       ("speedup_vs_hf_target_only_code", "vs HF (code)", ".2f"),
                       ("min_ratio_vs_ours_target_only", "min/prompt vs ours-TO", ".2f"),
                       ("acceptance_rate", "accept", ".2f"), ("mean_acceptance_length", "mean len", ".2f"),
                       ("mean_k", "mean K", ".2f"), ("analytic_bound", "bound", ".2f"),
                       ("fraction_of_bound", "of bound", ".2f")])
    print()
    print_table(per_prompt, [("prompt", "prompt", "s"), ("kind", "kind", "s")]
                + [(s, s, ".2f") for s in SYSTEMS])
    for r in rows:
        if r.get("acceptance_per_position"):
            print(f"per-position acceptance, {r['system']}: {r['acceptance_per_position']}")
    by = {r["system"]: r for r in rows}
    auto = by["ours draft K=auto"]
    goals = [
        goal("auto_vs_hf_assisted", auto["tokens_per_s"] / by["hf assisted"]["tokens_per_s"], 1.3),
        goal("auto_vs_hf_target_only_code", auto["speedup_vs_hf_target_only_code"], 2.0),
        goal("auto_vs_ours_target_only_every_prompt", auto["min_ratio_vs_ours_target_only"], 0.95),
        goal("auto_fraction_of_analytic_bound", auto.get("fraction_of_bound", 0.0), 0.85),
    ]
    print_goals(goals)
    out = write_result("spec", {"target": target, "draft": draft, "dtype": args.dtype, "prompts": len(prompts),
                                "max_tokens": n, "batch": 1, "reps": args.reps, "per_prompt": per_prompt},
                       rows, goals, "cpu", args.name)
    print(f"wrote {out}")
    llm.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
