"""`make bench-serve`: the real pair behind one gateway, driven through its OpenAI-compatible HTTP door by aiperf
(NVIDIA's serving benchmark, a client nobody here wrote) and through its gRPC door by our own small load generator
(bench/serve_grpc.py, measuring the same way), in one run.

Grid: concurrency 1, 4, 16 x chat and completion prompts (bench/prompts.py) x {HTTP K=auto, gRPC K=auto, HTTP K=0,
gRPC K=0} (K chosen per request with the `num_speculative_tokens` extension field / proto field), streaming, greedy,
EOS ignored, 64 tokens. Within each (concurrency, kind) the four systems run back to back, so the doors and the two
K settings share the machine's state. The verifier (TP=1) and the draft each have a core of their own (taskset);
the gateway and the load clients float, and each row records its client's CPU seconds.
"""
from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import math
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from bench.prompts import PROMPTS
from bench.report import fetched_pair, goal, plot_with, print_goals, print_table, write_result
from bench.serve_aiperf import aiperf_argv, run_aiperf, tokenizer_cache, write_dataset
from bench.serve_grpc import ServeRequest, run_load, summarize

KINDS = ("completion", "chat")
# The four systems of a cell, run back to back; every other cell runs the gRPC side first, so neither door always
# follows the other (the adaptive K's shared cost and acceptance estimates carry over from one run to the next).
SYSTEMS = (("http", "auto"), ("grpc", "auto"), ("http", "0"), ("grpc", "0"))
SYSTEMS_GRPC_FIRST = (("grpc", "auto"), ("http", "auto"), ("grpc", "0"), ("http", "0"))
K_FIELD = {"auto": -1, "0": 0}
# Requests per concurrency level: enough to fill the level (and at c=1 more than one request) within ~25 min.
DEFAULT_REQUESTS = {1: 3, 4: 8, 16: 16}
GOAL_HTTP_VS_GRPC, GOAL_AUTO_VS_K0 = 0.97, 1.3


def requests_for(kind: str, count: int) -> list[ServeRequest]:
    """`count` requests cycling over the fixed prompts of `kind` (chat: wrapped in the chat template)."""
    chat = kind == "chat"
    texts = [text for _, _, text, use_chat in PROMPTS if use_chat == chat]
    return [ServeRequest(text, chat) for text in itertools.islice(itertools.cycle(texts), count)]


def core_plan(cores: list[int]) -> dict[str, str]:
    """taskset core lists by service: the verifier and the draft take turns each round, and on a shared core each
    would wait for the other's threads; with fewer than 2 cores nothing is pinned."""
    return {"verifier": str(cores[0]), "draft": str(cores[1])} if len(cores) >= 2 else {}


def system_label(door: str, k: str) -> str:
    return f"{door} K={k}"


def ratios(rows: list[dict]) -> list[dict]:
    """Per (kind, concurrency): HTTP/gRPC tokens/s at K=auto and K=auto/K=0 over HTTP (None where a side failed)."""
    by = {(r["door"], r["k"], r["kind"], r["concurrency"]): r.get("output_tokens_per_s") for r in rows}
    out = []
    for kind, c in sorted({(r["kind"], r["concurrency"]) for r in rows}, key=lambda x: (x[1], x[0])):
        def ratio(a, b):
            x, y = by.get(a), by.get(b)
            return x / y if x and y else None
        out.append({"kind": kind, "concurrency": c,
                    "http_vs_grpc": ratio(("http", "auto", kind, c), ("grpc", "auto", kind, c)),
                    "auto_vs_k0_http": ratio(("http", "auto", kind, c), ("http", "0", kind, c)),
                    "auto_vs_k0_grpc": ratio(("grpc", "auto", kind, c), ("grpc", "0", kind, c))})
    return out


def geomean(values: list[float | None]) -> float:
    """Geometric mean; a missing value (a side that failed) makes it 0, so a goal on it cannot pass."""
    if not values or any(v is None or v <= 0 for v in values):
        return 0.0
    return math.exp(sum(math.log(v) for v in values) / len(values))


def serve_goals(rows: list[dict], ratio_rows: list[dict]) -> list[dict]:
    c1 = [r for r in ratio_rows if r["concurrency"] == 1]
    return [goal("http_vs_grpc_tokens_per_s", geomean([r["http_vs_grpc"] for r in ratio_rows]), GOAL_HTTP_VS_GRPC),
            goal("failed_requests", sum(r.get("errors", 0) for r in rows), 0, unit="", higher_is_better=False),
            goal("k_auto_vs_k0_c1_http", geomean([r["auto_vs_k0_http"] for r in c1]), GOAL_AUTO_VS_K0)]


def served_model(http_url: str, timeout_s: float = 10.0) -> str:
    with urllib.request.urlopen(f"{http_url}/v1/models", timeout=timeout_s) as resp:
        return json.load(resp)["data"][0]["id"]


def run_cell(door: str, k: str, kind: str, concurrency: int, count: int, args, ctx: dict) -> dict:
    reqs = requests_for(kind, count)
    row = {"system": system_label(door, k), "door": door, "k": k, "kind": kind, "concurrency": concurrency}
    try:
        if door == "http":
            dataset = write_dataset(ctx["work"] / f"{kind}-{count}.jsonl", reqs)
            out_dir = ctx["work"] / f"aiperf-{kind}-c{concurrency}-k{k}"
            argv = aiperf_argv(args.aiperf, url=ctx["http_url"], model=ctx["model"], chat=kind == "chat",
                               tokenizer=ctx["tokenizer"], dataset=dataset, max_tokens=args.max_tokens,
                               k=K_FIELD[k], concurrency=concurrency, request_count=count, seed=args.seed,
                               out_dir=out_dir)
            row.update(run_aiperf(argv, ctx["hf_home"], out_dir))
        else:
            cpu = time.process_time()
            t = time.perf_counter()
            timings = asyncio.run(run_load(ctx["grpc_target"], reqs, concurrency, args.max_tokens, K_FIELD[k]))
            row.update(summarize(timings), client_cpu_s=time.process_time() - cpu,
                       client_wall_s=time.perf_counter() - t)
    except Exception as e:                 # recorded as a failed configuration, never as a number
        row.update(requests=count, errors=count, failure=f"{type(e).__name__}: {e}")
    return row


def warm_up(args, ctx: dict) -> None:
    """Every prompt of the grid once, full length, K=auto (gRPC), then one request per door, kind and K setting: the
    services' prefix caches then hold every prompt for every row alike (measured: the first run of unseen prompts
    was ~30% slower, whichever door ran it), and first-call costs (connections, aiperf's tokenizer) stay out."""
    for kind in args.kinds:
        reqs = requests_for(kind, len(PROMPTS))
        distinct = list({r.text: r for r in reqs}.values())
        asyncio.run(run_load(ctx["grpc_target"], distinct, 1, args.max_tokens, -1))
        for k in K_FIELD.values():
            asyncio.run(run_load(ctx["grpc_target"], distinct[:1], 1, 8, k))
            _http_request(ctx, distinct[0], 8, k)


def _http_request(ctx: dict, req: ServeRequest, max_tokens: int, k: int) -> None:
    path = "/v1/chat/completions" if req.chat else "/v1/completions"
    body = {"model": ctx["model"], "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "num_speculative_tokens": k,
            **({"messages": [{"role": "user", "content": req.text}]} if req.chat else {"prompt": req.text})}
    r = urllib.request.Request(ctx["http_url"] + path, data=json.dumps(body).encode(),
                               headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(r, timeout=300) as resp:
        resp.read()


def run_grid(args, ctx: dict) -> list[dict]:
    rows = []
    cells = [(c, kind) for c in args.concurrency for kind in args.kinds]
    for i, (concurrency, kind) in enumerate(cells):
        count = args.requests.get(concurrency, max(concurrency, 2))
        for door, k in (SYSTEMS if i % 2 == 0 else SYSTEMS_GRPC_FIRST):
            row = run_cell(door, k, kind, concurrency, count, args, ctx)
            rows.append(row)
            tps = row.get("output_tokens_per_s")
            print(f"c={concurrency:>2} {kind:<10} {row['system']:<11} "
                  f"{f'{tps:6.2f} tok/s' if tps else 'FAILED':>12}  errors {row['errors']}/{row['requests']}"
                  f"{'  ' + row['failure'] if 'failure' in row else ''}", flush=True)
    return rows


def parse_requests(spec: str) -> dict[int, int]:
    """"1:3,4:8,16:16" -> {1: 3, 4: 8, 16: 16}."""
    return {int(c): int(n) for c, n in (part.split(":") for part in spec.split(",") if part)}


def arguments(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--aiperf", required=True, help="the aiperf executable (make bench-serve: .venv-bench/bin/aiperf)")
    ap.add_argument("--plot-python", default=None, help="a python with matplotlib (the bench venv's)")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--requests", type=parse_requests, default=DEFAULT_REQUESTS,
                    help="requests per concurrency level, e.g. 1:3,4:8,16:16")
    ap.add_argument("--kinds", nargs="+", default=list(KINDS), choices=KINDS)
    ap.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--target", default=None, help="target folder (default: the fetched 1.5B)")
    ap.add_argument("--draft", default=None, help="draft folder (default: the fetched 0.5B)")
    ap.add_argument("--no-pin", action="store_true", help="let the verifier and the draft float over all cores")
    ap.add_argument("--attach", nargs=2, metavar=("HTTP_URL", "GRPC_TARGET"), default=None,
                    help="drive a gateway that is already running instead of starting the topology")
    ap.add_argument("--name", default="serve", help="result file: bench/results/NAME.json")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = arguments(argv)
    if not os.access(args.aiperf, os.X_OK):
        print(f"bench-serve: aiperf not found at {args.aiperf} (make bench-serve installs it)", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="specd-bench-serve-"))
    if args.target and args.draft:
        target, draft = args.target, args.draft
    else:
        pair = fetched_pair("bench-serve")
        if pair is None:
            return 2
        target, draft = pair
    ctx = {"work": work, "hf_home": work / "hf"}
    ctx["tokenizer"] = tokenizer_cache(target, ctx["hf_home"])
    cores = {} if args.no_pin else core_plan(sorted(os.sched_getaffinity(0)))
    print(f"bench-serve: artifacts in {work}; cores {cores or 'not pinned'}", flush=True)
    if args.attach:
        ctx["http_url"], ctx["grpc_target"] = args.attach
        rows = _measure(args, ctx)
    else:
        from bench.serve_topology import pinned_topology
        with pinned_topology(target, draft, args.dtype, cores, work / "logs") as topo:
            ctx["http_url"], ctx["grpc_target"] = f"http://127.0.0.1:{topo.http_port}", f"127.0.0.1:{topo.gateway_port}"
            rows = _measure(args, ctx)

    ratio_rows = ratios(rows)
    print()
    print_table(rows, [("concurrency", "c", "d"), ("kind", "kind", "s"), ("system", "system", "s"),
                       ("output_tokens_per_s", "out tok/s", ".2f"), ("requests_per_s", "req/s", ".3f"),
                       ("ttft_ms_p50", "TTFT p50 ms", ".0f"), ("itl_ms_p50", "ITL p50 ms", ".1f"),
                       ("drafted", "drafted", "d"), ("mean_acceptance_length", "accept len", ".2f"),
                       ("errors", "errors", "d"), ("requests", "reqs", "d"), ("client_cpu_s", "client CPU s", ".1f")])
    print()
    print_table(ratio_rows, [("concurrency", "c", "d"), ("kind", "kind", "s"),
                             ("http_vs_grpc", "HTTP/gRPC tok/s (K=auto)", ".3f"),
                             ("auto_vs_k0_http", "K=auto/K=0 HTTP", ".2f"),
                             ("auto_vs_k0_grpc", "K=auto/K=0 gRPC", ".2f")])
    goals = serve_goals(rows, ratio_rows)
    print()
    print_goals(goals)
    config = {"target": target, "draft": draft, "dtype": args.dtype, "max_tokens": args.max_tokens,
              "concurrency": args.concurrency, "requests": {str(c): n for c, n in args.requests.items()},
              "kinds": args.kinds, "cores": cores, "http_client": _aiperf_version(args.aiperf),
              "grpc_client": "bench/serve_grpc.py", "ignore_eos": True, "temperature": 0, "ratios": ratio_rows}
    out = write_result("serve", config, rows, goals, "cpu", args.name)
    print(f"wrote {out}")
    plot_with(args.plot_python, Path(__file__).with_name("serve_plot.py"), out)
    return 0


def _measure(args, ctx: dict) -> list[dict]:
    ctx["model"] = served_model(ctx["http_url"])
    t = time.perf_counter()
    warm_up(args, ctx)
    print(f"warmed up in {time.perf_counter() - t:.0f}s; model {ctx['model']!r}", flush=True)
    return run_grid(args, ctx)


def _aiperf_version(aiperf: str) -> str:
    try:
        out = subprocess.run([aiperf, "--version"], capture_output=True, text=True, timeout=60).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        out = ""
    return f"aiperf {out}".strip()


if __name__ == "__main__":
    sys.exit(main())
