"""`make bench-scale`: verifier replicas and a verifier across two "nodes", the real pair as local services.

Part 1, replicas. Two verifiers (TP=1), each pinned to a core of its own (`taskset`), one draft; gateway `one`
dials replica A only, gateway `two` dials both (sessions routed to the least-loaded replica, then pinned). The
draft and the gateways float over both cores with one thread each: on a 2-core machine the draft cannot have a
core of its own, so with one replica it runs mostly on B's idle core and with two it competes with both (the
table says so; a third core would remove it). Each cell is `concurrency` requests at once, greedy, the cells of
both gateways interleaved per repetition; K=0 (target-only: the verifiers alone) and K=auto. Reported: aggregate
tokens/s, the ratio two/one, and how gateway `two` split the sessions (specd_verifier_routed_sessions).

Part 2, the extra hop. The same prompts one at a time at a fixed K through a TP=2 verifier on one node (one
process, two ranks, cores 0 and 1) and across two "nodes" (two `specd verifier` processes, one rank each, one
core each, gloo over loopback TCP, the c10d store in node 0): verify time per round as the gateway sees it
(stats.verify_ms / rounds) and as the verifier computed it (verify_compute_ms / rounds), and target-only ms per
token. Pre-drafting is off so the draft never computes beside a verify.
"""
from __future__ import annotations

import concurrent.futures as cf
import os
import sys
import tempfile
import time
from pathlib import Path

from bench.prompts import PROMPTS
from bench.wan import cpu_features
from bench.report import bench_arguments, fetched_pair, goal, plot_with, print_goals, print_table, write_result


REFRESH_S = 1.0           # the gateways' --verifier-refresh-s (Load polled this often)


def _insecure_verifier(target: str, dtype: str, port: int, *extra: str) -> list[str]:
    return ["verifier", "--model", target, "--dtype", dtype, "--port", str(port), "--insecure", *extra]


def _routed(metrics_port: int) -> dict[str, float]:
    from scripts.dev.metrics_scrape import scrape_by_label
    return scrape_by_label(metrics_port, "specd_verifier_routed_sessions_total", "replica")


def _run(client, ids, max_tokens: int, k, concurrency: int):
    """All prompts, `concurrency` at a time; (wall seconds, replies)."""
    def one(p):
        return client.generate(p, max_tokens=max_tokens, ignore_eos=True, num_speculative_tokens=k)
    t = time.perf_counter()
    with cf.ThreadPoolExecutor(concurrency) as pool:
        replies = list(pool.map(one, ids))
    return time.perf_counter() - t, replies


def replicas(args, target, draft, ids, logs) -> list[dict]:
    from bench.serve_topology import PinnedTopology
    from common.distributed import free_port
    from gateway.client import SpecdClient
    ports = {"verifier-a": free_port(), "verifier-b": free_port()}
    gws = {"one": (free_port(), free_port()), "two": (free_port(), free_port())}
    cores = {"verifier-a": "0", "verifier-b": "1", "draft": "0,1", "one": "0,1", "two": "0,1"}
    topo = PinnedTopology(target, draft, tp=1, dtype=args.dtype, ports=(free_port(), free_port(), free_port()),
                          k="auto", log_dir=logs, cores=cores)
    topo.env["SPECD_KV_CACHE_GIB"] = "0.5"
    topo.service_env["draft"] = {"OMP_NUM_THREADS": "1"}
    rows, clients = [], {}
    try:
        for name, port in ports.items():
            topo._spawn(name, _insecure_verifier(target, args.dtype, port, "--tp", "1"))
        topo.start_draft()
        for name, port in ports.items():
            topo.wait_serving(f"127.0.0.1:{port}", name, 900)
        topo.wait_serving(f"127.0.0.1:{topo.draft_port}", "draft", 900)
        upstream = {"one": f"127.0.0.1:{ports['verifier-a']}",
                    "two": f"127.0.0.1:{ports['verifier-a']},127.0.0.1:{ports['verifier-b']}"}
        for gw, (port, metrics_port) in gws.items():
            topo.service_env[gw] = {"SPECD_METRICS_PORT": str(metrics_port), "OMP_NUM_THREADS": "1"}
            # Load reports at most REFRESH_S old: each cell starts after a fresh one (the other gateway's sessions
            # on replica A have been released by then), so a stale report does not steer a whole burst to B.
            topo.start_gateway(gw, port=port, http_port=0, upstream=(upstream[gw], f"127.0.0.1:{topo.draft_port}"),
                               extra_args=("--verifier-refresh-s", str(REFRESH_S)))
        for gw, (port, _) in gws.items():
            topo.wait_serving(f"127.0.0.1:{port}", gw, 300)
            clients[gw] = SpecdClient(f"127.0.0.1:{port}", timeout_s=3600)
            _run(clients[gw], ids[:2], 8, "auto", 2)                # warm-up: connections, cost models
        for k in args.k:
            cells = {gw: {"wall": 0.0, "tokens": 0, "routed": {}, "outputs": None} for gw in gws}
            for rep in range(args.reps):
                for gw in (["one", "two"] if rep % 2 == 0 else ["two", "one"]):
                    c = cells[gw]
                    time.sleep(2 * REFRESH_S)
                    before = _routed(gws[gw][1])
                    wall, replies = _run(clients[gw], ids, args.max_tokens, k, args.concurrency)
                    after = _routed(gws[gw][1])
                    c["wall"] += wall
                    c["tokens"] += sum(len(r.token_ids) for r in replies)
                    for replica, v in after.items():
                        c["routed"][replica] = c["routed"].get(replica, 0) + v - before.get(replica, 0)
                    c["outputs"] = c["outputs"] or [list(r.token_ids) for r in replies]
                    print(f"K={k} {gw} replica(s) rep {rep}: {sum(len(r.token_ids) for r in replies) / wall:.2f} "
                          f"tok/s", flush=True)
            for gw, c in cells.items():
                a_address = f"127.0.0.1:{ports['verifier-a']}"
                routed = {"A" if replica == a_address else "B": int(v) for replica, v in c["routed"].items() if v}
                total = sum(routed.values()) or 1
                rows.append({"part": "replicas", "k": str(k), "replicas": 1 if gw == "one" else 2,
                             "concurrency": args.concurrency, "tokens_per_s": c["tokens"] / c["wall"],
                             "sessions_a": routed.get("A", 0), "sessions_b": routed.get("B", 0),
                             "share_b": routed.get("B", 0) / total,
                             "same_as_one": sum(a == b for a, b in zip(c["outputs"], cells["one"]["outputs"]))})
    finally:
        for c in clients.values():
            c.close()
        topo.stop()
    return rows


def tp_hop(args, target, draft, ids, logs) -> list[dict]:
    from bench.serve_topology import PinnedTopology
    from common.distributed import free_port
    from gateway.client import SpecdClient
    rows = []
    for layout in ("one node", "two nodes"):
        nnodes = 1 if layout == "one node" else 2
        cores = {"verifier": "0,1", "verifier-node1": "1", "draft": "0,1", "gateway": "0,1"}
        if nnodes == 2:
            cores["verifier"] = "0"
        (logs / layout.replace(" ", "-")).mkdir(parents=True, exist_ok=True)
        topo = PinnedTopology(target, draft, tp=2, nnodes=nnodes, dtype=args.dtype,
                              ports=(free_port(), free_port(), free_port()), k="auto",
                              log_dir=logs / layout.replace(" ", "-"), cores=cores)
        topo.env["SPECD_KV_CACHE_GIB"] = "0.25"
        topo.service_env["draft"] = {"OMP_NUM_THREADS": "1"}
        topo.service_env["gateway"] = {"OMP_NUM_THREADS": "1"}
        try:
            topo.start_verifier()
            topo.start_draft()
            topo.wait_serving(f"127.0.0.1:{topo.verifier_port}", "verifier", 900)
            topo.wait_serving(f"127.0.0.1:{topo.draft_port}", "draft", 900)
            topo.start_gateway(extra_args=("--pre-draft", "off"))
            topo.wait_serving(f"127.0.0.1:{topo.gateway_port}", "gateway", 300)
            with SpecdClient(f"127.0.0.1:{topo.gateway_port}", timeout_s=3600) as client:
                _run(client, ids[:1], 8, args.hop_k, 1)              # warm-up
                for k in (args.hop_k, 0):
                    verify_ms = compute_ms = rounds = tokens = 0
                    wall = 0.0
                    for rep in range(args.reps):
                        w, replies = _run(client, ids[:args.hop_prompts], args.max_tokens, k, 1)
                        wall += w
                        for r in replies:
                            verify_ms += r.stats.verify_ms
                            compute_ms += r.stats.verify_compute_ms
                            rounds += r.stats.rounds
                            tokens += len(r.token_ids)
                    rows.append({"part": "tp-hop", "layout": layout, "k": str(k), "rounds": rounds,
                                 "verify_ms_per_round": verify_ms / rounds, "compute_ms_per_round": compute_ms / rounds,
                                 "tokens_per_s": tokens / wall})
                    print(f"TP=2 {layout} K={k}: {verify_ms / rounds:.1f} ms per verify round "
                          f"({compute_ms / rounds:.1f} computing), {tokens / wall:.2f} tok/s", flush=True)
        finally:
            topo.stop()
    return rows


def goals_of(rows: list[dict]) -> list[dict]:
    goals = []
    rep = {(r["k"], r["replicas"]): r for r in rows if r["part"] == "replicas"}
    for k in sorted({k for k, _ in rep}):
        if (k, 1) in rep and (k, 2) in rep:
            goals.append(goal(f"two_replicas_vs_one_K{k}", rep[(k, 2)]["tokens_per_s"] / rep[(k, 1)]["tokens_per_s"],
                              1.6))
            goals.append(goal(f"session_share_of_replica_b_K{k}", rep[(k, 2)]["share_b"], 0.3))
    hop = {(r["layout"], r["k"]): r for r in rows if r["part"] == "tp-hop"}
    for k in sorted({k for _, k in hop}):
        if ("one node", k) in hop and ("two nodes", k) in hop:
            two, one = hop[("two nodes", k)], hop[("one node", k)]
            goals.append(goal(f"two_nodes_vs_one_node_verify_ms_per_round_K{k}",
                              two["verify_ms_per_round"] / one["verify_ms_per_round"], 1.25, higher_is_better=False))
    return goals


def main(argv=None) -> int:
    ap = bench_arguments(__doc__, "scale", max_tokens=48, reps=2, prompts=8)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--k", nargs="+", default=["0", "auto"], help="num_speculative_tokens of the replica cells")
    ap.add_argument("--hop-k", type=int, default=4, help="the fixed K of the TP-hop part")
    ap.add_argument("--hop-prompts", type=int, default=3)
    ap.add_argument("--parts", nargs="+", default=["replicas", "tp-hop"], choices=["replicas", "tp-hop"])
    ap.add_argument("--plot-python", default=None, help="a python with matplotlib (the bench venv's)")
    args = ap.parse_args(argv)
    args.k = [int(k) if k.lstrip("-").isdigit() else k for k in args.k]
    pair = fetched_pair("bench-scale")
    if pair is None:
        return 2
    target, draft = pair
    from common.tokenizer import encode_prompt, load_tokenizer
    tok = load_tokenizer(target)
    ids = [encode_prompt(tok, text, chat) for _, _, text, chat in (PROMPTS * 4)[:args.prompts]]
    logs = Path(tempfile.mkdtemp(prefix="specd-bench-scale-"))
    rows = []
    if "replicas" in args.parts:
        rows += replicas(args, target, draft, ids, logs)
    if "tp-hop" in args.parts:
        rows += tp_hop(args, target, draft, ids, logs)
    print()
    rep_rows = [r for r in rows if r["part"] == "replicas"]
    if rep_rows:
        print_table(rep_rows, [("k", "K", "s"), ("replicas", "verifiers", "d"), ("concurrency", "concurrent", "d"),
                               ("tokens_per_s", "tok/s", ".2f"), ("sessions_a", "sessions A", "d"),
                               ("sessions_b", "sessions B", "d"), ("same_as_one", "=1 replica", "d")])
        print()
    hop_rows = [r for r in rows if r["part"] == "tp-hop"]
    if hop_rows:
        print_table(hop_rows, [("layout", "TP=2 on", "s"), ("k", "K", "s"), ("rounds", "rounds", "d"),
                               ("verify_ms_per_round", "verify ms/round", ".1f"),
                               ("compute_ms_per_round", "compute ms/round", ".1f"), ("tokens_per_s", "tok/s", ".2f")])
    goals = goals_of(rows)
    print_goals(goals)
    out = write_result("scale", {"target": target, "draft": draft, "dtype": args.dtype, "max_tokens": args.max_tokens,
                                 "prompts": len(ids), "reps": args.reps, "concurrency": args.concurrency,
                                 "k": [str(k) for k in args.k], "hop_k": args.hop_k, "hop_prompts": args.hop_prompts,
                                 "cpu_features": cpu_features(),
                                 # kernels capped below the CPU's own (ATEN_CPU_CAPABILITY / ONEDNN_MAX_CPU_ISA)
                                 "kernel_caps": {k: os.environ[k] for k in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA")
                                                 if k in os.environ},
                                 "logs": str(logs)}, rows, goals, "cpu", args.name)
    print(f"wrote {out}")
    plot_with(args.plot_python, Path(__file__).with_name("scale_plot.py"), out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
