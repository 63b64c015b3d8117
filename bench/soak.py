"""`make soak` (not in CI): the real pair through the gateway for `--minutes` (20 by default) under chaos, with a few
client threads mixing greedy, seeded-sampled, cancelled and short-deadline requests over short and long, code and
prose prompts, while the draft service is SIGKILLed and restarted every ~2 minutes and the verifier once halfway.

It reports what completed and what failed (by status; failures during the verifier restart window are counted apart
from the others), whether every greedy output equals its target-only reference, the verifier sessions and KV blocks
left at the end (Prometheus), each service's RSS growth after warm-up, and p50/p99 latency; writes
bench/results/soak.json.

float32, because greedy speculative output is promised to equal the target's token for token: in bfloat16 a verify
forward over K+1 positions (or a batch of several sessions) rounds differently from a one-token decode, so near-tie
argmaxes can flip and a mismatch would say nothing about the faults under test. The reference is computed through
the same gateway with num_speculative_tokens=0 (the verifier alone: target-only) before any fault is injected.

Counting: a stream the client closes early is `cancelled`, and a short-deadline request whose own deadline passes is
`client_deadline`; neither is a failure. Every other non-OK status is a failure, and it falls in the verifier
restart window when the request's lifetime overlaps [kill, SERVING again + WINDOW_GRACE_S]."""
from __future__ import annotations

import argparse
import gc
import json
import random
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

from bench.prompts import PROMPTS
from bench.report import fetched_pair, goal, print_goals, print_table, write_result
from scripts.dev.metrics_scrape import scrape

DRAFT_EVERY_S = 120.0           # draft SIGKILL + restart period (the first one after half a period)
WINDOW_GRACE_S = 5.0            # after the restarted verifier is SERVING: the gateway's channel reconnects
RSS_EVERY_S = 5.0
RSS_WARMUP_S = 30.0             # a process is measured from this long after the load (or its restart) began
RSS_MIN_LIFE_S = 45.0           # a life shorter than this after warm-up is not measured (the first draft's)
NORMAL_TIMEOUT_S = 180.0
KIND_WEIGHTS = {"greedy": 0.4, "sampled": 0.3, "cancelled": 0.15, "short_deadline": 0.15}

_SHORT = {kind: next(text for _, k, text, chat in PROMPTS if k == kind and not chat) for kind in ("code", "prose")}
_LONG = {kind: "\n\n".join(text for _, k, text, _ in PROMPTS if k == kind or (kind == "prose" and k == "qa")) * 3
         for kind in ("code", "prose")}
# The greedy set: each is checked against its reference. (name, text)
GREEDY_PROMPTS = [("code_short", _SHORT["code"]), ("code_long", _LONG["code"]),
                  ("prose_short", _SHORT["prose"]), ("prose_long", _LONG["prose"])]
OTHER_PROMPTS = [text for _, _, text, _ in PROMPTS] + [_LONG["code"], _LONG["prose"]]


def rss_bytes(pid: int) -> int | None:
    import psutil
    try:
        p = psutil.Process(pid)
        if p.status() == psutil.STATUS_ZOMBIE:             # killed, not yet reaped: its RSS reads 0
            return None
        return p.memory_info().rss + sum(c.memory_info().rss for c in p.children(recursive=True))
    except psutil.Error:
        return None


class Soak:
    """The shared record of one run: requests, fault windows, RSS samples."""

    def __init__(self, topo, greedy_ref: dict[str, list[int]], max_tokens: int, seconds: float, seed: int):
        self.topo, self.ref, self.max_tokens, self.seconds = topo, greedy_ref, max_tokens, seconds
        self.rng_seed = seed
        self.lock = threading.Lock()
        self.requests: list[dict] = []
        self.events: list[dict] = []
        self.windows: list[tuple[float, float]] = []          # verifier restart: (kill, SERVING again + grace)
        self.serving_since: dict[int, float] = {}              # pid -> when its measurement may start
        self.rss: dict[int, list[tuple[float, int]]] = {}
        self.pid_name: dict[int, str] = {}
        self.stop = threading.Event()
        self.t0 = 0.0

    # ---- clients -----------------------------------------------------------------------------------------------
    def client_loop(self, index: int) -> None:
        import grpc
        from gateway.client import SpecdClient
        rng = random.Random(self.rng_seed * 1000 + index)
        client = SpecdClient(f"127.0.0.1:{self.topo.gateway_port}", timeout_s=NORMAL_TIMEOUT_S)
        try:
            while time.monotonic() - self.t0 < self.seconds:
                kind = rng.choices(list(KIND_WEIGHTS), weights=list(KIND_WEIGHTS.values()))[0]
                rec = {"kind": kind, "client": index, "start": time.monotonic()}
                try:
                    self._one(client, kind, rng, rec)
                    rec.setdefault("status", "OK")
                except grpc.RpcError as e:
                    code = e.code().name
                    if kind == "short_deadline" and code == "DEADLINE_EXCEEDED":
                        rec["status"] = "client_deadline"
                    elif kind == "cancelled" and code == "CANCELLED" and rec.get("cancelled"):
                        rec["status"] = "cancelled"
                    else:
                        rec["status"], rec["details"] = code, (e.details() or "")[:300]
                rec["end"] = time.monotonic()
                with self.lock:
                    self.requests.append(rec)
                if rec["status"] not in ("OK", "cancelled", "client_deadline"):
                    time.sleep(rng.uniform(0.3, 0.8))           # a refused client backs off, as a real one would
        finally:
            client.close()

    def _one(self, client, kind: str, rng: random.Random, rec: dict) -> None:
        stub = client.stub
        if kind == "greedy":
            name, text = rng.choice(GREEDY_PROMPTS)
            rec["prompt"], stream = name, rng.random() < 0.5
            req = client.request(text, max_tokens=self.max_tokens, ignore_eos=True)
            if stream:
                tokens = [t for c in stub.GenerateStream(req, timeout=NORMAL_TIMEOUT_S) for t in c.token_ids]
            else:
                tokens = list(stub.Generate(req, timeout=NORMAL_TIMEOUT_S).token_ids)
            rec["tokens"], rec["equal_to_reference"] = len(tokens), tokens == self.ref[name]
        elif kind == "sampled":
            req = client.request(rng.choice(OTHER_PROMPTS), max_tokens=rng.randint(4, self.max_tokens),
                                 temperature=0.8, top_p=0.95, seed=rng.randrange(2**31))
            rec["tokens"] = len(stub.Generate(req, timeout=NORMAL_TIMEOUT_S).token_ids)
        elif kind == "cancelled":
            req = client.request(rng.choice(OTHER_PROMPTS), max_tokens=4 * self.max_tokens, ignore_eos=True)
            call = stub.GenerateStream(req, timeout=NORMAL_TIMEOUT_S)
            for _ in range(rng.randint(1, 3)):
                next(call)
            rec["cancelled"] = True
            call.cancel()
            list(call)                                          # raises CANCELLED
        else:
            deadline = rng.uniform(0.5, 4.0)
            req = client.request(rng.choice(OTHER_PROMPTS), max_tokens=self.max_tokens, ignore_eos=True)
            if rng.random() < 0.5:
                list(stub.GenerateStream(req, timeout=deadline))
            else:
                stub.Generate(req, timeout=deadline)

    # ---- faults ------------------------------------------------------------------------------------------------
    def chaos(self) -> None:
        verifier_at = self.seconds / 2
        draft_at = [t for t in (DRAFT_EVERY_S / 2 + i * DRAFT_EVERY_S for i in range(1000))
                    if t < self.seconds - 30 and abs(t - verifier_at) > 40]
        plan = sorted([(t, "draft") for t in draft_at] + [(verifier_at, "verifier")])
        for at, name in plan:
            while time.monotonic() - self.t0 < at:
                if self.stop.wait(0.5):
                    return
            address = f"127.0.0.1:{self.topo.draft_port if name == 'draft' else self.topo.verifier_port}"
            killed = time.monotonic()
            self.topo.kill(name)
            (self.topo.start_draft if name == "draft" else self.topo.start_verifier)()
            self.topo.wait_serving(address, name, 900)
            serving = time.monotonic()
            pid = self.topo.procs[name].pid
            self.pid_name[pid] = name
            self.serving_since[pid] = serving + RSS_WARMUP_S
            if name == "verifier":
                self.windows.append((killed, serving + WINDOW_GRACE_S))
            ev = {"service": name, "killed_at_s": round(killed - self.t0, 1),
                  "serving_again_after_s": round(serving - killed, 1)}
            self.events.append(ev)
            print(f"[{killed - self.t0:6.0f}s] {name} SIGKILLed, SERVING again after {ev['serving_again_after_s']}s",
                  flush=True)

    def sample_rss(self) -> None:
        while not self.stop.wait(RSS_EVERY_S):
            now = time.monotonic()
            for name, proc in list(self.topo.procs.items()):
                if proc.poll() is None and (rss := rss_bytes(proc.pid)) is not None:
                    self.pid_name.setdefault(proc.pid, name)
                    self.rss.setdefault(proc.pid, []).append((now, rss))

    def progress(self) -> None:
        while not self.stop.wait(30):
            with self.lock:
                c = Counter(r["status"] for r in self.requests)
            print(f"[{time.monotonic() - self.t0:6.0f}s] {dict(c)}", flush=True)

    def in_window(self, rec: dict) -> bool:
        return any(rec["start"] <= b and rec["end"] >= a for a, b in self.windows)


def rss_rows(soak: Soak) -> list[dict]:
    rows = []
    for pid, samples in soak.rss.items():
        since = soak.serving_since.get(pid, soak.t0 + RSS_WARMUP_S)
        warm = [s for s in samples if s[0] >= since]
        if len(warm) < 2 or warm[-1][0] - warm[0][0] < RSS_MIN_LIFE_S:
            continue                                            # too short a life to say anything
        first, last = warm[0][1], warm[-1][1]
        rows.append({"service": soak.pid_name[pid], "pid": pid, "from_s": round(warm[0][0] - soak.t0),
                     "to_s": round(warm[-1][0] - soak.t0), "rss_warm_mib": first / 2**20,
                     "rss_end_mib": last / 2**20, "rss_growth": last / first - 1,
                     "rss_max_mib": max(s[1] for s in warm) / 2**20})
    return sorted(rows, key=lambda r: (r["service"], r["from_s"]))


def total_failed_by_status(rows: list[dict]) -> dict:
    return next(r["failed_by_status"] for r in rows if r["kind"] == "all")


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    return s[min(len(s) - 1, max(0, int(round(q / 100 * len(s) + 0.5)) - 1))]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--minutes", type=float, default=20.0)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--name", default="soak", help="result file: bench/results/NAME.json")
    args = ap.parse_args(argv)
    pair = fetched_pair("soak")
    if pair is None:
        return 2
    target, draft = pair
    from common.distributed import free_port
    from gateway.client import SpecdClient
    from scripts.dev.topology import LocalTopology

    logs = Path(tempfile.mkdtemp(prefix="specd-soak-"))
    topo = LocalTopology(target, draft, tp=1, dtype="float32", ports=(free_port(), free_port(), free_port()),
                         k="auto", log_dir=logs, extra_env={"SPECD_KV_CACHE_GIB": "0.25"})
    metrics = {name: free_port() for name in ("gateway", "draft", "verifier")}
    for name, port in metrics.items():
        topo.service_env[name] = {"SPECD_METRICS_PORT": str(port)}
    seconds = args.minutes * 60
    print(f"soak: {args.minutes:g} min, {args.clients} clients, logs in {logs}", flush=True)
    try:
        started = time.monotonic()
        topo.start(timeout_s=900)
        print(f"topology SERVING after {time.monotonic() - started:.0f}s", flush=True)
        # Target-only reference (K=0: the verifier alone), before any fault; this also warms every service.
        ref = {}
        with SpecdClient(f"127.0.0.1:{topo.gateway_port}", timeout_s=600) as c:
            for name, text in GREEDY_PROMPTS:
                ref[name] = list(c.generate(text, max_tokens=args.max_tokens, ignore_eos=True,
                                            num_speculative_tokens=0).token_ids)
            for name, text in GREEDY_PROMPTS:                   # speculative warm-up (draft too)
                c.generate(text, max_tokens=4, ignore_eos=True)
        gc.collect()
        soak = Soak(topo, ref, args.max_tokens, seconds, args.seed)
        soak.t0 = time.monotonic()
        threads = [threading.Thread(target=soak.client_loop, args=(i,), daemon=True) for i in range(args.clients)]
        helpers = [threading.Thread(target=f, daemon=True) for f in (soak.sample_rss, soak.progress)]
        chaos = threading.Thread(target=soak.chaos, daemon=True)
        for t in (*threads, *helpers, chaos):
            t.start()
        for t in threads:
            t.join()
        soak.stop.set()
        chaos.join(timeout=900)
        end = time.monotonic()
        for name, proc in topo.procs.items():                  # the last RSS sample, after the load
            if proc.poll() is None and (rss := rss_bytes(proc.pid)) is not None:
                soak.rss.setdefault(proc.pid, []).append((end, rss))
                soak.pid_name.setdefault(proc.pid, name)
        # Left at the end: poll a few seconds for the gateway's releases to land.
        deadline, left = time.monotonic() + 10, {}
        while True:
            v, d = scrape(metrics["verifier"]), scrape(metrics["draft"])
            left = {"verifier_sessions": v.get("specd_verifier_sessions", float("nan")),
                    "verifier_kv_blocks_used": v.get("specd_kv_blocks_used", float("nan")),
                    "draft_kv_blocks_used": d.get("specd_kv_blocks_used", float("nan"))}
            if not any(left.values()) or time.monotonic() > deadline:
                break
            time.sleep(0.5)
    finally:
        topo.stop()

    reqs = soak.requests
    client_chose = ("cancelled", "client_deadline")
    rows = []
    for kind in (*KIND_WEIGHTS, "all"):
        rs = [r for r in reqs if kind == "all" or r["kind"] == kind]
        failed = [r for r in rs if r["status"] not in ("OK", *client_chose)]
        ok_ms = [(r["end"] - r["start"]) * 1000 for r in rs if r["status"] == "OK"]
        greedy = [r for r in rs if "equal_to_reference" in r]
        rows.append({"kind": kind, "sent": len(rs), "completed": sum(r["status"] == "OK" for r in rs),
                     "cancelled": sum(r["status"] == "cancelled" for r in rs),
                     "client_deadline": sum(r["status"] == "client_deadline" for r in rs),
                     "failed_in_verifier_restart": sum(soak.in_window(r) for r in failed),
                     "failed_outside": sum(not soak.in_window(r) for r in failed),
                     "failed_by_status": dict(Counter(r["status"] for r in failed)),
                     "greedy_equal": sum(r["equal_to_reference"] for r in greedy) if greedy else None,
                     "greedy_checked": len(greedy) if greedy else None,
                     "p50_ms": percentile(ok_ms, 50), "p99_ms": percentile(ok_ms, 99)})
    services = rss_rows(soak)
    failures = [{"kind": r["kind"], "status": r["status"], "at_s": round(r["start"] - soak.t0, 1),
                 "in_verifier_restart": soak.in_window(r), "details": r.get("details", "")}
                for r in reqs if r["status"] not in ("OK", *client_chose)]

    print()
    print_table(rows, [("kind", "kind", "s"), ("sent", "sent", "d"), ("completed", "ok", "d"),
                       ("cancelled", "cancelled", "d"), ("client_deadline", "deadline", "d"),
                       ("failed_in_verifier_restart", "failed in restart", "d"),
                       ("failed_outside", "failed outside", "d"), ("greedy_equal", "greedy equal", "d"),
                       ("greedy_checked", "greedy checked", "d"), ("p50_ms", "p50 ms", ".0f"),
                       ("p99_ms", "p99 ms", ".0f")])
    print()
    print_table(services, [("service", "service", "s"), ("pid", "pid", "d"), ("from_s", "from s", "d"),
                           ("to_s", "to s", "d"), ("rss_warm_mib", "RSS warm MiB", ".0f"),
                           ("rss_end_mib", "RSS end MiB", ".0f"), ("rss_growth", "growth", ".2%")])
    print(f"\nfaults: {soak.events}")
    print(f"left at the end: {left}")
    print(f"failed by status: {total_failed_by_status(rows)}")
    inside = [f for f in failures if f["in_verifier_restart"]]
    for f in [*inside[:3], *(f for f in failures if not f["in_verifier_restart"])]:
        print(f"failed: {f}")
    total = rows[-1]
    by_service: dict[str, float] = {}
    for r in services:
        by_service[r["service"]] = max(by_service.get(r["service"], -1.0), r["rss_growth"])
    goals = [goal("failed_outside_verifier_restart", total["failed_outside"], 0, unit="", higher_is_better=False),
             goal("greedy_equal_to_reference", (total["greedy_equal"] or 0) / max(1, total["greedy_checked"] or 0),
                  1.0, unit=""),
             goal("sessions_left", left["verifier_sessions"], 0, unit="", higher_is_better=False),
             goal("kv_blocks_left", left["verifier_kv_blocks_used"], 0, unit="", higher_is_better=False)]
    goals += [goal(f"rss_growth_{name}", growth, 0.05, unit="", higher_is_better=False)
              for name, growth in sorted(by_service.items())]
    print_goals(goals)
    config = {"target": target, "draft": draft, "dtype": "float32", "tp": 1, "k": "auto", "minutes": args.minutes,
              "clients": args.clients, "max_tokens": args.max_tokens, "kv_cache_gib": 0.25, "seed": args.seed,
              "kind_weights": KIND_WEIGHTS, "draft_every_s": DRAFT_EVERY_S, "window_grace_s": WINDOW_GRACE_S,
              "rss_warmup_s": RSS_WARMUP_S, "rss_min_life_s": RSS_MIN_LIFE_S, "logs": str(logs)}
    out = write_result("soak", config, [*rows, *services], goals, "cpu", args.name)
    doc = json.loads(out.read_text())                          # what the rows cannot hold: the run's story
    doc.update(faults=soak.events, left_at_end=left, failures=failures)
    out.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
