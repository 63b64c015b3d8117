"""`make bench-spec` (second part): the cost and the effect of batch-invariant numerics, on the real
Qwen2.5-Coder 0.5B→1.5B pair in bf16, greedy.

Two engines side by side in one process, one with `batch_invariant` and one without, each target-only and
speculative (draft, K=auto), at batch 1 (each prompt alone) and batch 8 (the 8 bench prompts in one call),
interleaved per repetition. Reports tokens/s, the cost of the mode (on / off), and the fraction of prompts whose
speculative output equals target-only output in each mode (goal: 100% with the mode on).
"""
from __future__ import annotations

import statistics
import sys
import time

from bench.prompts import PROMPTS
from bench.report import bench_arguments, fetched_pair, goal, print_goals, print_table, write_result

MODES = {"off": False, "on": True}
SYSTEMS = [("target-only", 0), ("K=auto", "auto")]


def main(argv=None) -> int:
    args = bench_arguments(__doc__, "invariant", max_tokens=64, reps=2, prompts=len(PROMPTS)).parse_args(argv)

    from common.llm import LLM
    from common.speculative.params import SamplingParams
    from common.tokenizer import encode_prompt
    pair = fetched_pair("bench-spec")
    if pair is None:
        return 2
    target, draft = pair
    t0 = time.perf_counter()
    llms = {m: LLM(target, draft, num_speculative_tokens="auto", dtype=args.dtype, kv_cache_memory_gib=0.5,
                   batch_invariant=on) for m, on in MODES.items()}
    print(f"loaded both engines in {time.perf_counter() - t0:.0f}s", flush=True)
    prompts = PROMPTS[:args.prompts]
    ids = [encode_prompt(llms["off"].tokenizer, text, chat) for _, _, text, chat in prompts]
    n = args.max_tokens
    greedy = SamplingParams(max_tokens=n, ignore_eos=True)

    def run(mode: str, k, batch: list[list[int]]):
        t = time.perf_counter()
        outs = llms[mode].generate(batch, greedy, num_speculative_tokens=k, proposer=None if k == 0 else "draft")
        return time.perf_counter() - t, [o.token_ids for o in outs]

    for mode in MODES:                                                       # warm-up
        for _, k in SYSTEMS:
            run(mode, k, [ids[0][:8]])
    cells = [(mode, name, k, batch) for batch in (1, 8) for mode in MODES for name, k in SYSTEMS]
    times = {(mode, name, batch): [] for mode, name, _, batch in cells}
    outputs: dict[tuple, list[list[int]]] = {}
    for rep in range(args.reps):
        for mode, name, k, batch in cells:
            key = (mode, name, batch)
            if batch == 1:
                dt, toks = 0.0, []
                for p in ids:
                    d, [out] = run(mode, k, [p])
                    dt += d
                    toks.append(out)
            else:
                dt, toks = run(mode, k, ids)
            times[key].append(dt)
            outputs.setdefault(key, toks)
            print(f"rep {rep + 1}/{args.reps} batch {batch} {mode:3s} {name:11s} {len(ids) * n / dt:6.2f} tokens/s",
                  flush=True)

    def tps(key):
        return len(ids) * n / statistics.median(times[key])

    rows = []
    for batch in (1, 8):
        for mode in MODES:
            for name, _ in SYSTEMS:
                key = (mode, name, batch)
                same = [a == b for a, b in zip(outputs[(mode, "K=auto", batch)], outputs[(mode, "target-only", batch)])]
                rows.append({"batch": batch, "mode": mode, "system": name, "tokens_per_s": tps(key),
                             "on_vs_off": tps(("on", name, batch)) / tps(("off", name, batch)),
                             "spec_equals_target_only": sum(same) / len(same),
                             "differing_prompts": [prompts[i][0] for i, s in enumerate(same) if not s]})
    print()
    print_table(rows, [("batch", "batch", "d"), ("mode", "invariant", "s"), ("system", "system", "s"),
                       ("tokens_per_s", "tok/s", ".2f"), ("on_vs_off", "on/off", ".3f"),
                       ("spec_equals_target_only", "spec = target-only", ".0%")])
    for r in rows:
        if r["system"] == "K=auto" and r["differing_prompts"]:
            print(f"batch {r['batch']}, invariant {r['mode']}: K=auto output differs from target-only on "
                  f"{', '.join(r['differing_prompts'])}")
    by = {(r["batch"], r["mode"], r["system"]): r for r in rows}
    goals = [goal(f"on_vs_off_{name.replace('=', '_').replace('-', '_')}_batch_{b}",
                  by[(b, "on", name)]["on_vs_off"], 0.90) for b in (1, 8) for name, _ in SYSTEMS]
    goals += [goal(f"spec_equals_target_only_on_batch_{b}", by[(b, "on", "K=auto")]["spec_equals_target_only"],
                   1.0, unit="") for b in (1, 8)]
    print_goals(goals)
    out = write_result("invariant", {"target": target, "draft": draft, "dtype": args.dtype, "prompts": len(prompts),
                                     "max_tokens": n, "reps": args.reps}, rows, goals, "cpu", args.name)
    print(f"wrote {out}")
    for llm in llms.values():
        llm.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
