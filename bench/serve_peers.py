"""`make bench-serve-peers`: specd's OpenAI-compatible door against llama-server's, one client for both.

The same aiperf (bench/serve_aiperf.py) drives, one after another on the same machine: specd's gateway HTTP door in
front of an int4 verifier (the GGUF's Q4_K blocks) and an int4 draft, with K=auto and K=0 per request (the
`num_speculative_tokens` extension field; llama-server ignores it), and llama-server on the same GGUF file,
target-only and speculative (draft-max 3, its default), with as many slots as the highest concurrency. Completion
prompts (bench/prompts.py), streaming, greedy, EOS ignored, 64 tokens, concurrency 1 and 4. Nothing is pinned:
each side gets the machine's cores, specd's verifier and draft 2 threads each (they take turns within a round),
llama-server 2 threads. Output tokens/s is aiperf's (all requests' output tokens over the run's duration).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

from bench.report import fetched_pair, goal, print_goals, print_table, write_result
from bench.serve import requests_for, served_model
from bench.serve_aiperf import aiperf_argv, run_aiperf, tokenizer_cache, write_dataset

REQUESTS = {1: 3, 4: 8}
SPECD_SYSTEMS = (("specd K=auto", -1), ("specd K=0", 0))
LLAMA_SYSTEMS = (("llama.cpp", None), ("llama.cpp spec draft-max 3", 3))


def _cell(system: str, url: str, k: int, concurrency: int, count: int, args, ctx: dict) -> dict:
    reqs = requests_for("completion", count)
    dataset = write_dataset(ctx["work"] / f"completion-{count}.jsonl", reqs)
    out_dir = ctx["work"] / "aiperf" / f"{system.replace(' ', '_')}-c{concurrency}"
    argv = aiperf_argv(args.aiperf, url=url, model=served_model(url), chat=False, tokenizer=ctx["tokenizer"],
                       dataset=dataset, max_tokens=args.max_tokens, k=k, concurrency=concurrency,
                       request_count=count, seed=args.seed, out_dir=out_dir)
    row = {"system": system, "concurrency": concurrency, **run_aiperf(argv, ctx["hf_home"], out_dir)}
    print(f"{system} c={concurrency}: {row.get('output_tokens_per_s') or 0:.2f} tok/s "
          f"({row.get('errors', 0)} errors)", flush=True)
    return row


def _grid(systems, url: str, args, ctx: dict) -> list[dict]:
    _cell("warm-up", url, systems[0][1], 1, 1, args, ctx)              # first-request costs stay out of the rows
    return [_cell(name, url, k, c, args.requests[c], args, ctx) for c in args.concurrency for name, k in systems]


def measure_specd(target: str, draft: str, target_gguf: Path, args, ctx: dict) -> list[dict]:
    from bench.serve_topology import pinned_topology
    topo = pinned_topology(target, draft, "bfloat16", {}, ctx["work"] / "logs")
    topo.service_env["verifier"] = {"SPECD_QUANTIZATION": "int4", "SPECD_GGUF": str(target_gguf)}
    topo.service_env["draft"] = {"SPECD_QUANTIZATION": "int4"}
    with topo:
        return _grid(SPECD_SYSTEMS, f"http://127.0.0.1:{topo.http_port}", args, ctx)


def measure_llama(bin_dir: Path, target_gguf: Path, draft_gguf: Path, args, ctx: dict) -> list[dict]:
    from bench.llama_cpp import LlamaServer
    rows = []
    for name, draft_max in LLAMA_SYSTEMS:
        server = LlamaServer(bin_dir, target_gguf, draft_gguf if draft_max else None, draft_max or 3, threads=2,
                             log_path=ctx["work"] / "logs" / f"{name.replace(' ', '_')}.log",
                             parallel=max(args.concurrency))
        with server:
            rows += _grid(((name, 0),), server.url, args, ctx)
    return rows


def ratios(rows: list[dict]) -> list[dict]:
    by = {(r["system"], r["concurrency"]): r.get("output_tokens_per_s") for r in rows}
    out = []
    for c in sorted({r["concurrency"] for r in rows}):
        best_llama = max((by.get((n, c)) or 0) for n, _ in LLAMA_SYSTEMS)
        llama = by.get(("llama.cpp", c)) or 0
        auto, k0 = by.get(("specd K=auto", c)) or 0, by.get(("specd K=0", c)) or 0
        out.append({"concurrency": c, "specd_auto_vs_llama": auto / llama if llama else None,
                    "specd_k0_vs_llama": k0 / llama if llama else None,
                    "specd_best_vs_llama_best": max(auto, k0) / best_llama if best_llama else None})
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--aiperf", required=True, help="the aiperf executable (.venv-bench/bin/aiperf)")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--concurrency", type=int, nargs="+", default=sorted(REQUESTS))
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--name", default="serve_peers")
    args = ap.parse_args(argv)
    args.requests = {c: REQUESTS.get(c, 2 * c) for c in args.concurrency}
    if not os.access(args.aiperf, os.X_OK):
        print(f"bench-serve-peers: aiperf not found at {args.aiperf}", file=sys.stderr)
        return 2
    pair = fetched_pair("bench-serve-peers")
    if pair is None:
        return 2
    target, draft = pair
    from bench import llama_cpp
    from common.models.fetch import DRAFT_MODEL, TARGET_MODEL, gguf_path
    target_gguf, draft_gguf = gguf_path(TARGET_MODEL), gguf_path(DRAFT_MODEL)
    bin_dir = llama_cpp.build(log=lambda m: print(f"[llama.cpp] {m}", flush=True))   # raises on a failed build
    work = Path(tempfile.mkdtemp(prefix="specd-bench-serve-peers-"))
    ctx = {"work": work, "hf_home": work / "hf"}
    ctx["tokenizer"] = tokenizer_cache(target, ctx["hf_home"])
    print(f"bench-serve-peers: artifacts in {work}", flush=True)
    rows = measure_llama(bin_dir, target_gguf, draft_gguf, args, ctx) + measure_specd(target, draft, target_gguf,
                                                                                         args, ctx)
    ratio_rows = ratios(rows)
    print()
    print_table(rows, [("concurrency", "c", "d"), ("system", "system", "s"),
                       ("output_tokens_per_s", "out tok/s", ".2f"), ("ttft_ms_p50", "TTFT p50 ms", ".0f"),
                       ("itl_ms_p50", "ITL p50 ms", ".1f"), ("mean_acceptance_length", "accept len", ".2f"),
                       ("errors", "errors", "d"), ("requests", "reqs", "d")])
    print()
    print_table(ratio_rows, [("concurrency", "c", "d"), ("specd_auto_vs_llama", "specd K=auto / llama.cpp", ".3f"),
                             ("specd_k0_vs_llama", "specd K=0 / llama.cpp", ".3f"),
                             ("specd_best_vs_llama_best", "best specd / best llama.cpp", ".3f")])
    goals = [goal(f"c={r['concurrency']}: best specd / best llama.cpp (HTTP, same client)",
                  r["specd_best_vs_llama_best"] or 0, 1.0) for r in ratio_rows]
    print()
    print_goals(goals)
    out = write_result("serve_peers", {"max_tokens": args.max_tokens, "concurrency": args.concurrency,
                                       "requests": {str(c): n for c, n in args.requests.items()},
                                       "specd": "int4/vnni verifier (GGUF Q4_K) + int4 draft, gateway HTTP",
                                       "llama_cpp": "llama-server, same GGUFs, 2 threads",
                                       "ratios": ratio_rows}, rows, goals, "cpu", args.name)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
