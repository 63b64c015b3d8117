"""`make bench-wan`: pre-drafting and the network-aware K over an emulated WAN, the real pair on two emulated nodes.

The draft service is pinned to core 0 and the verifier (TP=1) to core 1 (`taskset`), so their compute overlaps as on
two machines; the gateways share core 0. Every gateway dials both services through one in-process delay proxy
(bench/delay_proxy.py) whose one-way delay is set live, so all systems cross the same links. Systems, each its own
gateway process in front of the same two services:

- target-only: K=0 through the gateway (num_speculative_tokens=0);
- sequential, per-step K: today's rounds, the cost model that divides a draft call's time by its steps;
- sequential, network K: the same rounds, K from the cost model that keeps each call's fixed cost apart;
- pre-drafting: the network K, and round r + 1 drafted while round r is verified;
- sequential / pre-drafting at K=3: the pre-draft mechanism alone, apart from what the K controller chooses.

For each delay, after one warm-up request per gateway (its cost model learns the new links), the prompts run with
the systems interleaved per prompt (batch 1) or per group of `batch` concurrent prompts. Reported per cell: tokens/s,
mean K per round, pre-draft hit rate (the gateway's specd_pre_drafts_total), and the draft's and verifier's CPU
utilisation (their processes' CPU seconds over the cell's wall time). Greedy outputs are checked equal across the
speculative systems and target-only (bf16: equal where the kernels agree, counted, not asserted).

The default is the issue's full matrix (hours on a 2-core CPU); `--delays-ms 0 10 25 --temperatures 0 --batch 1
--prompts 3 --max-tokens 40` is a reduced run that still covers the three goals.
"""
from __future__ import annotations

import concurrent.futures as cf
import os
import sys
import tempfile
import time
from pathlib import Path

from bench.prompts import PROMPTS
from bench.report import bench_arguments, fetched_pair, goal, plot_with, print_goals, print_table, write_result

# system -> (gateway name, gateway flags, num_speculative_tokens)
SYSTEMS = {
    "target-only": ("gw-network", (), 0),
    "sequential, per-step K": ("gw-per-step", ("--pre-draft", "off", "--k-cost-model", "per-step"), "auto"),
    "sequential, network K": ("gw-network", ("--pre-draft", "off", "--k-cost-model", "network"), "auto"),
    "pre-drafting": ("gw-pre-draft", ("--pre-draft", "on", "--k-cost-model", "network"), "auto"),
    # The same two at a fixed K: the pre-draft mechanism alone, whatever the K controller decides on this processor.
    "sequential, K=3": ("gw-network", ("--pre-draft", "off", "--k-cost-model", "network"), 3),
    "pre-drafting, K=3": ("gw-pre-draft", ("--pre-draft", "on", "--k-cost-model", "network"), 3),
}
GATEWAY_FLAGS = {gw: flags for gw, flags, _ in SYSTEMS.values() if flags}


def cpu_features() -> list[str]:
    """The processor's vector and matrix features that decide whether a (K+1)-row verify is nearly free."""
    flags = set()
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            break
    return sorted(f for f in flags if f.startswith(("avx", "amx")) or f == "fma")


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process, all its threads."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def pre_draft_counts(metrics_port: int) -> dict[str, float]:
    from scripts.dev.metrics_scrape import scrape_by_label
    return scrape_by_label(metrics_port, "specd_pre_drafts_total", "outcome")


def run_cell(client, prompts, max_tokens: int, temperature: float, k, batch: int, seed: int):
    """The prompts in groups of `batch` concurrent requests; (wall seconds, replies)."""
    def one(i_p):
        i, p = i_p
        return client.generate(p, max_tokens=max_tokens, ignore_eos=True, temperature=temperature,
                               seed=seed + i if temperature else None, num_speculative_tokens=k)
    replies, wall = [], 0.0
    with cf.ThreadPoolExecutor(batch) as pool:
        for start in range(0, len(prompts), batch):
            group = list(enumerate(prompts))[start:start + batch]
            t = time.perf_counter()
            replies += list(pool.map(one, group))
            wall += time.perf_counter() - t
    return wall, replies


def main(argv=None) -> int:
    ap = bench_arguments(__doc__, "wan", prompts=len(PROMPTS), reps=1)
    ap.add_argument("--delays-ms", nargs="+", type=float, default=[0.0, 2.5, 10.0, 25.0],
                    help="one-way delays (RTT = 2x)")
    ap.add_argument("--temperatures", nargs="+", type=float, default=[0.0, 0.7])
    ap.add_argument("--batch", nargs="+", type=int, default=[1, 4])
    ap.add_argument("--systems", nargs="+", default=list(SYSTEMS), choices=list(SYSTEMS))
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--plot-python", default=None, help="a python with matplotlib (the bench venv's)")
    args = ap.parse_args(argv)

    from bench.delay_proxy import DelayProxy, Route
    from bench.serve_topology import pinned_topology
    from common.distributed import free_port
    from gateway.client import SpecdClient
    pair = fetched_pair("bench-wan")
    if pair is None:
        return 2
    target, draft = pair
    logs = Path(tempfile.mkdtemp(prefix="specd-bench-wan-"))
    cores = {"verifier": "1", "draft": "0", **{gw: "0" for gw in GATEWAY_FLAGS}}
    topo = pinned_topology(target, draft, args.dtype, cores, logs)
    topo.env["SPECD_KV_CACHE_GIB"] = "0.5"
    proxy = DelayProxy([Route(0, "127.0.0.1", topo.verifier_port), Route(0, "127.0.0.1", topo.draft_port)])
    rows, outputs = [], {}
    try:
        topo.start_verifier()
        topo.start_draft()
        topo.wait_serving(f"127.0.0.1:{topo.verifier_port}", "verifier", 900)
        topo.wait_serving(f"127.0.0.1:{topo.draft_port}", "draft", 900)
        proxy.start()
        upstream = (f"127.0.0.1:{proxy.routes[0].port}", f"127.0.0.1:{proxy.routes[1].port}")
        ports, clients = {}, {}
        for gw, flags in GATEWAY_FLAGS.items():
            ports[gw] = (free_port(), free_port())
            topo.service_env[gw] = {"SPECD_METRICS_PORT": str(ports[gw][1])}
            topo.start_gateway(gw, port=ports[gw][0], http_port=0, extra_args=flags, upstream=upstream)
        for gw in GATEWAY_FLAGS:
            topo.wait_serving(f"127.0.0.1:{ports[gw][0]}", gw, 300)
            clients[gw] = SpecdClient(f"127.0.0.1:{ports[gw][0]}", timeout_s=3600)
        from common.tokenizer import encode_prompt, load_tokenizer
        tok = load_tokenizer(target)
        ids = [encode_prompt(tok, text, chat) for _, _, text, chat in PROMPTS[:args.prompts]]
        pids = {name: topo.procs[name].pid for name in ("draft", "verifier")}
        systems = {name: SYSTEMS[name] for name in args.systems}
        for delay in args.delays_ms:
            proxy.set_delay(delay / 1000)
            for gw, client in clients.items():                  # each cost model learns the links of this delay
                client.generate(ids[0], max_tokens=16, ignore_eos=True)
            for temperature in args.temperatures:
                for batch in args.batch:
                    cells = {name: {"wall": 0.0, "tokens": 0, "rounds": 0, "drafted": 0, "accepted": 0,
                                    "cpu": {p: 0.0 for p in pids}, "pre": {}, "outputs": []} for name in systems}
                    for rep in range(args.reps):
                        for g in range(0, len(ids), batch):
                            group = ids[g:g + batch]
                            order = list(systems)[g // batch % len(systems):] + \
                                list(systems)[:g // batch % len(systems)]          # rotate who goes first
                            for name in order:
                                gw, _, k = systems[name]
                                c = cells[name]
                                cpu0 = {p: cpu_seconds(pid) for p, pid in pids.items()}
                                pre0 = pre_draft_counts(ports[gw][1])
                                wall, replies = run_cell(clients[gw], group, args.max_tokens, temperature, k, batch,
                                                         args.seed + g)
                                for p, pid in pids.items():
                                    c["cpu"][p] += cpu_seconds(pid) - cpu0[p]
                                for outcome, v in pre_draft_counts(ports[gw][1]).items():
                                    c["pre"][outcome] = c["pre"].get(outcome, 0.0) + v - pre0.get(outcome, 0.0)
                                c["wall"] += wall
                                c["tokens"] += sum(len(r.token_ids) for r in replies)
                                c["rounds"] += sum(r.stats.rounds for r in replies)
                                c["drafted"] += sum(r.stats.drafted for r in replies)
                                c["accepted"] += sum(r.stats.accepted for r in replies)
                                if rep == 0:
                                    c["outputs"] += [list(r.token_ids) for r in replies]
                    for name, c in cells.items():
                        pre = c["pre"]
                        used = sum(pre.values())
                        row = {"system": name, "delay_ms": delay, "rtt_ms": 2 * delay, "temperature": temperature,
                               "batch": batch, "tokens_per_s": c["tokens"] / c["wall"], "tokens": c["tokens"],
                               "rounds": c["rounds"], "mean_k": c["drafted"] / max(1, c["rounds"]),
                               "acceptance": c["accepted"] / c["drafted"] if c["drafted"] else None,
                               "tokens_per_round": c["tokens"] / max(1, c["rounds"]),
                               "pre_draft_hit_rate": pre.get("hit", 0.0) / used if used else None,
                               "pre_drafts": {k: int(v) for k, v in pre.items()},
                               "draft_util": c["cpu"]["draft"] / c["wall"],
                               "verify_util": c["cpu"]["verifier"] / c["wall"]}
                        if temperature == 0 and "target-only" in cells:
                            row["same_as_target_only"] = sum(a == b for a, b in zip(c["outputs"],
                                                                                  cells["target-only"]["outputs"]))
                        outputs[(name, delay, temperature, batch)] = c["outputs"]
                        rows.append(row)
                        print(f"RTT {2 * delay:g} ms T={temperature} batch {batch} {name}: "
                              f"{row['tokens_per_s']:.2f} tok/s, K {row['mean_k']:.2f}, hit "
                              f"{row['pre_draft_hit_rate'] if row['pre_draft_hit_rate'] is not None else '-'}, "
                              f"util draft {row['draft_util']:.2f} verify {row['verify_util']:.2f}", flush=True)
    finally:
        for c in locals().get("clients", {}).values():
            c.close()
        topo.stop()
        proxy.stop()

    print()
    print_table(rows, [("system", "system", "s"), ("rtt_ms", "RTT ms", "g"), ("temperature", "T", "g"),
                       ("batch", "batch", "d"), ("tokens_per_s", "tok/s", ".2f"), ("mean_k", "K", ".2f"),
                       ("acceptance", "accept", ".2f"), ("tokens_per_round", "tok/round", ".2f"),
                       ("pre_draft_hit_rate", "hit rate", ".2f"), ("draft_util", "draft util", ".2f"),
                       ("verify_util", "verify util", ".2f"), ("same_as_target_only", "=target", "d")])
    goals = goals_of(rows)
    print_goals(goals)
    out = write_result("wan", {"target": target, "draft": draft, "dtype": args.dtype, "max_tokens": args.max_tokens,
                               "prompts": len(ids), "reps": args.reps, "delays_ms": args.delays_ms,
                               "temperatures": args.temperatures, "batch": args.batch, "systems": args.systems,
                               "cores": cores, "cpu_features": cpu_features()}, rows, goals, "cpu", args.name)
    print(f"wrote {out}")
    plot_with(args.plot_python, Path(__file__).with_name("wan_plot.py"), out)
    return 0


def goals_of(rows: list[dict]) -> list[dict]:
    """The issue's goals, for every (temperature, batch) the run has, where its delays were measured."""
    by = {(r["system"], r["rtt_ms"], r["temperature"], r["batch"]): r["tokens_per_s"] for r in rows}
    goals = []
    for t, b in sorted({(r["temperature"], r["batch"]) for r in rows}):
        def ratio(a, c, rtt):
            return by[(a, rtt, t, b)] / by[(c, rtt, t, b)] if (a, rtt, t, b) in by and (c, rtt, t, b) in by else None
        tag = f"T{t:g}_batch{b}"
        for name, value, target in [
                (f"rtt20_pre_draft_vs_sequential_{tag}", ratio("pre-drafting", "sequential, per-step K", 20.0), 1.3),
                (f"rtt20_pre_draft_vs_target_only_{tag}", ratio("pre-drafting", "target-only", 20.0), 2.0),
                (f"rtt0_pre_draft_vs_sequential_{tag}", ratio("pre-drafting", "sequential, network K", 0.0), 0.97),
                (f"rtt50_network_k_vs_per_step_k_{tag}", ratio("sequential, network K", "sequential, per-step K",
                                                               50.0), 1.1),
                (f"rtt20_pre_draft_k3_vs_sequential_k3_{tag}", ratio("pre-drafting, K=3", "sequential, K=3", 20.0),
                 1.3),
                (f"rtt0_pre_draft_k3_vs_sequential_k3_{tag}", ratio("pre-drafting, K=3", "sequential, K=3", 0.0),
                 0.97)]:
            if value is not None:
                goals.append(goal(name, value, target))
    return goals


if __name__ == "__main__":
    sys.exit(main())
