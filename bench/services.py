"""`make bench-services`: the real pair, greedy, 128 tokens: in-process speculative (K=auto) vs through the
gateway with the verifier at TP=1 and TP=2, one request at a time and 8 concurrent.

Per-round time is split into draft compute, verify compute, and network + serialization (the gateway's RPC
wall time minus what the services report computing and queueing). Bytes on the wire are the serialized Propose/Verify
requests and replies. Topologies run one after another (each needs the CPU to itself), prompts and settings
identical; within a topology the batch-1 and batch-8 runs alternate per repetition.
"""
from __future__ import annotations

import concurrent.futures as cf
import statistics
import sys
import tempfile
import time
from pathlib import Path

from bench.prompts import PROMPTS
from bench.report import bench_arguments, fetched_pair, goal, print_goals, print_table, write_result


def _gateway_runs(client, prompts, max_tokens, concurrent: bool):
    def one(p):
        t = time.perf_counter()
        r = client.generate(p, max_tokens=max_tokens, ignore_eos=True)
        return time.perf_counter() - t, r
    t = time.perf_counter()
    if concurrent:
        with cf.ThreadPoolExecutor(len(prompts)) as pool:
            results = list(pool.map(one, prompts))
    else:
        results = [one(p) for p in prompts]
    wall = time.perf_counter() - t
    replies = [r for _, r in results]
    tokens = sum(len(r.token_ids) for r in replies)
    rounds = sum(r.stats.rounds for r in replies)
    s = {k: sum(getattr(r.stats, k) for r in replies) for k in
         ("draft_ms", "verify_ms", "draft_compute_ms", "verify_compute_ms", "queue_ms", "wire_bytes", "accepted",
          "total_ms")}
    # What the gateway waited on RPCs beyond the services' own compute and queueing: network + serialization.
    network_ms = (s["draft_ms"] - s["draft_compute_ms"]) + (s["verify_ms"] - s["verify_compute_ms"]) - s["queue_ms"]
    round_ms = s["total_ms"] / rounds
    return {"tokens_per_s": tokens / wall, "rounds": rounds, "tokens": tokens,
            "draft_ms_per_round": s["draft_compute_ms"] / rounds, "verify_ms_per_round": s["verify_compute_ms"] / rounds,
            "queue_ms_per_round": s["queue_ms"] / rounds,
            "network_ms_per_round": network_ms / rounds, "round_ms": round_ms,
            "network_share": network_ms / s["total_ms"], "bytes_per_round": s["wire_bytes"] / rounds,
            "bytes_per_accepted_token": s["wire_bytes"] / max(1, s["accepted"])}, [list(r.token_ids) for r in replies]


def main(argv=None) -> int:
    ap = bench_arguments(__doc__, "services", prompts=len(PROMPTS))
    ap.add_argument("--tp", nargs="+", type=int, default=[1, 2])
    args = ap.parse_args(argv)

    from common.distributed import free_port
    from common.llm import LLM
    from common.speculative.params import SamplingParams
    from common.tokenizer import encode_prompt
    from gateway.client import SpecdClient
    from scripts.dev.topology import LocalTopology
    pair = fetched_pair("bench-services")
    if pair is None:
        return 2
    target, draft = pair
    n = args.max_tokens
    greedy = SamplingParams(max_tokens=n, ignore_eos=True)
    rows, outputs = [], {}

    # ---- in process ---------------------------------------------------------------------------------------
    with LLM(target, draft, num_speculative_tokens="auto", dtype=args.dtype, kv_cache_memory_gib=0.5) as llm:
        ids = [encode_prompt(llm.tokenizer, text, chat) for _, _, text, chat in PROMPTS[:args.prompts]]
        llm.generate([ids[0][:8]], SamplingParams(max_tokens=4))                       # warm-up
        for batch in (1, 8):
            tps = []
            for rep in range(args.reps):
                t = time.perf_counter()
                outs = ([llm.generate([p], greedy)[0] for p in ids] if batch == 1 else
                        llm.generate(ids[:8], greedy))
                tps.append(sum(len(o.token_ids) for o in outs) / (time.perf_counter() - t))
                outputs[("in-process speculative", batch)] = [o.token_ids for o in outs]
                print(f"in-process batch {batch} rep {rep + 1}: {tps[-1]:.2f} tokens/s", flush=True)
            rows.append({"system": "in-process speculative", "batch": batch, "tokens_per_s": statistics.median(tps),
                         "tokens_per_s_min": min(tps), "tokens_per_s_max": max(tps)})

    # ---- through the gateway ------------------------------------------------------------------------------
    for tp in args.tp:
        logs = Path(tempfile.mkdtemp(prefix=f"specd-bench-tp{tp}-"))
        ports = (free_port(), free_port(), free_port())
        with LocalTopology(target, draft, tp=tp, dtype=args.dtype, ports=ports, k="auto", log_dir=logs) as topo:
            with SpecdClient(f"127.0.0.1:{topo.gateway_port}") as client:
                client.generate(ids[0][:8], max_tokens=4)                               # warm-up
                per = {1: [], 8: []}
                for rep in range(args.reps):
                    for batch in (1, 8):
                        res, toks = _gateway_runs(client, ids if batch == 1 else ids[:8], n, batch == 8)
                        per[batch].append(res)
                        outputs[(f"gateway tp={tp}", batch)] = toks
                        print(f"gateway tp={tp} batch {batch} rep {rep + 1}: {res['tokens_per_s']:.2f} tokens/s, "
                              f"network {res['network_share']:.1%} of round time", flush=True)
                for batch, results in per.items():
                    med = sorted(results, key=lambda r: r["tokens_per_s"])[len(results) // 2]
                    rows.append({"system": f"gateway tp={tp}", "batch": batch, **med,
                                 "tokens_per_s_min": min(r["tokens_per_s"] for r in results),
                                 "tokens_per_s_max": max(r["tokens_per_s"] for r in results)})
    for row in rows:
        row["same_tokens_as_in_process"] = outputs[(row["system"], row["batch"])] == \
            outputs[("in-process speculative", row["batch"])] if row["system"] != "in-process speculative" else None

    print()
    print_table(rows, [("system", "system", "s"), ("batch", "batch", "d"), ("tokens_per_s", "tok/s", ".2f"),
                       ("round_ms", "round ms", ".1f"), ("draft_ms_per_round", "draft ms", ".1f"),
                       ("verify_ms_per_round", "verify ms", ".1f"), ("queue_ms_per_round", "queue ms", ".1f"),
                       ("network_ms_per_round", "net ms", ".2f"),
                       ("network_share", "net share", ".3f"), ("bytes_per_round", "B/round", ".0f"),
                       ("bytes_per_accepted_token", "B/accepted", ".0f")])
    by = {(r["system"], r["batch"]): r for r in rows}
    base = by[("in-process speculative", 1)]["tokens_per_s"]
    goals = []
    for tp in args.tp:
        gw1, gw8 = by[(f"gateway tp={tp}", 1)], by[(f"gateway tp={tp}", 8)]
        goals += [goal(f"gateway_tp{tp}_vs_in_process_batch1", gw1["tokens_per_s"] / base, 0.95),
                  goal(f"gateway_tp{tp}_network_share", gw1["network_share"], 0.03, unit="", higher_is_better=False),
                  goal(f"gateway_tp{tp}_8_concurrent_vs_1", gw8["tokens_per_s"] / gw1["tokens_per_s"], 2.5)]
    print_goals(goals)
    out = write_result("services", {"target": target, "draft": draft, "dtype": args.dtype, "max_tokens": n,
                                    "prompts": len(ids), "reps": args.reps, "tp": args.tp}, rows, goals, "cpu",
                       args.name)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
