"""`make bench-cache`: the prefix cache and the cost of tracing, on the real target, through the gateway.

Part 1 (cache): a 1,024-token shared system prompt + 16 short user turns, one request at a time, each asking
for its first token only (max_tokens=1: the request is its prefill). The same requests run with the verifier's
prefix cache off, in-process (local tier only) and Redis only (a real redis-server; the local tier disabled
so every hit crosses the wire), one topology after another. Reported: time to first token (streamed, client
side) of the first request (a miss in every mode) and the median of the other 15, the verifier's prefill
compute summed over all 16, and the prompt tokens served from the cache.

Part 2 (tracing): the full topology (draft + verifier + gateway) twice, tracing off and tracing on with a real
OTLP receiver in this process; both are up at once and requests alternate between them per repetition, so
both see the same machine. Tokens/s of 4 prompts x 64 tokens, greedy.
"""
from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

from bench.prompts import PROMPTS
from bench.report import bench_arguments, fetched_pair, goal, print_goals, print_table, write_result

USER_TURNS = [
    "How do I reverse a linked list?", "What does this error mean: KeyError?", "Write a binary search.",
    "Explain Python decorators briefly.", "How do I read a CSV file?", "What is a race condition?",
    "Sort a dict by value.", "What is the GIL?", "How do I time a function?", "Explain list comprehensions.",
    "What is dependency injection?", "How do I mock a network call?", "What is tail recursion?",
    "How do I profile memory?", "Explain async and await.", "What is a closure?",
]


def system_prompt_ids(tokenizer, n: int) -> list[int]:
    """Exactly `n` token ids of a coding assistant's system prompt (the guideline text repeated)."""
    text = ("You are a careful senior software engineer. Answer with correct, idiomatic, well tested code, "
            "explain trade-offs briefly, prefer the standard library, name things clearly, handle errors "
            "explicitly, and never invent APIs. ")
    ids: list[int] = []
    i = 0
    while len(ids) < n:
        ids += tokenizer.encode(f"Rule {i}: {text}", add_special_tokens=False)
        i += 1
    return ids[:n]


def _ttft(client, ids: list[int]) -> tuple[float, object]:
    t = time.perf_counter()
    first, stats = None, None
    for chunk in client.stream(ids, max_tokens=1, ignore_eos=True):
        if first is None and chunk.token_ids:
            first = time.perf_counter() - t
        if chunk.HasField("stats"):
            stats = chunk.stats
    return first, stats


def cache_part(target: str, tokenizer, dtype: str, system_tokens: int) -> tuple[list[dict], dict]:
    from common.distributed import free_port
    from gateway.client import SpecdClient
    from scripts.dev.topology import LocalTopology
    from scripts.dev.redis_server import RedisServer, write_hmac_key_file

    system = system_prompt_ids(tokenizer, system_tokens)
    requests = [system + tokenizer.encode(f"\nUser: {u}\nAssistant:", add_special_tokens=False) for u in USER_TURNS]
    redis = RedisServer(maxmemory="1gb")
    modes = {"off": {"SPECD_NO_PREFIX_CACHE": "1"},
             "in-process": {"SPECD_PREFIX_CACHE_MIB": "512"},
             "redis": {"SPECD_PREFIX_CACHE_MIB": "0", "REDIS_URL": redis.url, "SPECD_PREFIX_CACHE_HMAC_KEY_FILE":
                       str(write_hmac_key_file(Path(tempfile.mkdtemp(prefix="specd-bench-cache-key-"))))}}
    rows = []
    try:
        for mode, env in modes.items():
            logs = Path(tempfile.mkdtemp(prefix=f"specd-bench-cache-{mode}-"))
            ports = (free_port(), free_port(), free_port())
            with LocalTopology(target, None, tp=1, dtype=dtype, ports=ports, k="0", log_dir=logs,
                               extra_env=env) as topo, \
                    SpecdClient(f"127.0.0.1:{topo.gateway_port}") as client:
                _ttft(client, [1, 2, 3])                                                    # warm-up
                ttfts, compute_ms, cached = [], 0.0, 0
                for i, ids in enumerate(requests):
                    ttft, stats = _ttft(client, ids)
                    ttfts.append(ttft)
                    compute_ms += stats.verify_compute_ms
                    cached += stats.prefix_cached_tokens
                    print(f"cache {mode}: request {i + 1}/{len(requests)} ttft {ttft * 1000:.0f} ms, "
                          f"{stats.prefix_cached_tokens} cached tokens", flush=True)
                    if i == 0:
                        time.sleep(1.0)          # let the first request's blocks be published (asynchronous)
            hits = ttfts[1:]
            rows.append({"mode": mode, "ttft_first_ms": ttfts[0] * 1000, "ttft_median_ms": statistics.median(hits) * 1000,
                         "ttft_min_ms": min(hits) * 1000, "ttft_max_ms": max(hits) * 1000,
                         "prefill_compute_ms": compute_ms, "cached_tokens": cached,
                         "prompt_tokens": sum(len(r) for r in requests)})
    finally:
        redis.stop()
    by = {r["mode"]: r for r in rows}
    return rows, by


def tracing_part(target: str, draft: str, tokenizer, dtype: str, reps: int, max_tokens: int) -> tuple[list[dict], list]:
    from common.distributed import free_port
    from tests.otlp_receiver import OtlpReceiver
    from common.tokenizer import encode_prompt
    from gateway.client import SpecdClient
    from scripts.dev.topology import LocalTopology

    ids = [encode_prompt(tokenizer, text, chat) for _, _, text, chat in PROMPTS[:4]]
    receiver = OtlpReceiver()
    envs = {"off": {}, "on": {"OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{receiver.port}"}}
    topos, clients = {}, {}
    tps: dict[str, list[float]] = {m: [] for m in envs}
    outputs = {}
    try:
        for mode, env in envs.items():
            logs = Path(tempfile.mkdtemp(prefix=f"specd-bench-trace-{mode}-"))
            ports = (free_port(), free_port(), free_port())
            topos[mode] = LocalTopology(target, draft, tp=1, dtype=dtype, ports=ports, k="auto", log_dir=logs,
                                        extra_env={**env, "SPECD_NO_PREFIX_CACHE": "1"})
            topos[mode].start()
            clients[mode] = SpecdClient(f"127.0.0.1:{topos[mode].gateway_port}")
            clients[mode].generate(ids[0][:8], max_tokens=4)                                   # warm-up
        for rep in range(reps):
            for mode in (("off", "on") if rep % 2 == 0 else ("on", "off")):
                t = time.perf_counter()
                replies = [clients[mode].generate(p, max_tokens=max_tokens, ignore_eos=True) for p in ids]
                tps[mode].append(sum(len(r.token_ids) for r in replies) / (time.perf_counter() - t))
                outputs[mode] = [list(r.token_ids) for r in replies]
                print(f"tracing {mode} rep {rep + 1}: {tps[mode][-1]:.2f} tokens/s", flush=True)
        time.sleep(6)                                              # the batch processors' export interval
        spans = receiver.spans()
    finally:
        for c in clients.values():
            c.close()
        for t in topos.values():
            t.stop()
        receiver.stop()
    services = sorted({s.service for s in spans})
    rows = [{"mode": m, "tokens_per_s": statistics.median(v), "tokens_per_s_min": min(v), "tokens_per_s_max": max(v),
             "spans_received": len(spans) if m == "on" else 0,
             "same_tokens_as_off": outputs[m] == outputs["off"]} for m, v in tps.items()]
    print(f"tracing on: {len(spans)} spans received over OTLP from {services}")
    return rows, services


def main(argv=None) -> int:
    ap = bench_arguments(__doc__, "cache", max_tokens=64, reps=4)
    ap.add_argument("--system-tokens", type=int, default=1024)
    ap.add_argument("--skip-tracing", action="store_true")
    args = ap.parse_args(argv)

    from common.tokenizer import load_tokenizer
    pair = fetched_pair("bench-cache")
    if pair is None:
        return 2
    target, draft = pair
    tokenizer = load_tokenizer(target)

    cache_rows, by = cache_part(target, tokenizer, args.dtype, args.system_tokens)
    print()
    print_table(cache_rows, [("mode", "prefix cache", "s"), ("ttft_first_ms", "TTFT 1st ms", ".0f"),
                             ("ttft_median_ms", "TTFT p50 ms (2-16)", ".0f"), ("ttft_min_ms", "min", ".0f"),
                             ("ttft_max_ms", "max", ".0f"), ("prefill_compute_ms", "prefill compute ms", ".0f"),
                             ("cached_tokens", "cached tokens", "d"), ("prompt_tokens", "prompt tokens", "d")])
    off = by["off"]["ttft_median_ms"]
    goals = [goal("redis_hit_ttft_speedup_vs_no_cache", off / by["redis"]["ttft_median_ms"], 10.0),
             goal("in_process_hit_ttft_speedup_vs_no_cache", off / by["in-process"]["ttft_median_ms"], 10.0)]
    rows = [{"part": "cache", **r} for r in cache_rows]
    if not args.skip_tracing:
        trace_rows, services = tracing_part(target, draft, tokenizer, args.dtype, args.reps, args.max_tokens)
        print()
        print_table(trace_rows, [("mode", "tracing", "s"), ("tokens_per_s", "tok/s", ".2f"),
                                 ("tokens_per_s_min", "min", ".2f"), ("tokens_per_s_max", "max", ".2f"),
                                 ("spans_received", "spans", "d")])
        t = {r["mode"]: r["tokens_per_s"] for r in trace_rows}
        goals.append(goal("tracing_on_tokens_per_s_vs_off", t["on"] / t["off"], 0.98))
        rows += [{"part": "tracing", "services_traced": services, **r} for r in trace_rows]
    print_goals(goals)
    out = write_result("cache", {"target": target, "draft": draft, "dtype": args.dtype,
                                 "system_tokens": args.system_tokens, "user_turns": len(USER_TURNS),
                                 "tracing_reps": args.reps, "tracing_max_tokens": args.max_tokens},
                       rows, goals, "cpu", args.name)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
