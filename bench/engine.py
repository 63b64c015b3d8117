"""`make bench-engine`: greedy decoding on the real target, our paged engine vs transformers `generate`.

Both systems live in their own worker process (so each one's peak RSS is its own) and are driven alternately
from this process: same prompts, same run, interleaved repetitions. Reports tokens/s, ratio ours/HF, peak RSS.
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import resource
import sys
import time

from bench.prompts import PROMPTS
from bench.report import Stat, goal, print_goals, print_table, write_result


def _worker(system: str, model_path: str, dtype: str, device: str, conn) -> None:
    import torch
    from common.tokenizer import load_tokenizer
    torch.manual_seed(0)
    tok = load_tokenizer(model_path)
    if system == "hf":
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=getattr(torch, dtype)).to(device).eval()
        tok.padding_side = "left"
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    else:
        from common.config import EngineConfig
        from common.engine.greedy import greedy_generate
        from common.engine.tp_executor import TPExecutor
        executor = TPExecutor(EngineConfig(model=model_path, dtype=dtype, device=device, kv_cache_memory_gib=1.0))
    conn.send(("ready", None))
    while True:
        msg = conn.recv()
        if msg is None:
            break
        prompt_ids, max_new = msg
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t = time.perf_counter()
        if system == "hf":
            batch = tok.pad({"input_ids": prompt_ids}, return_tensors="pt").to(device)
            with torch.inference_mode():
                out = model.generate(**batch, do_sample=False, max_new_tokens=max_new, min_new_tokens=max_new,
                                     pad_token_id=pad)
            tokens = out[:, batch["input_ids"].shape[1]:].tolist()
        else:
            tokens = [r.token_ids for r in greedy_generate(executor, prompt_ids, max_new)]
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        dt = time.perf_counter() - t
        rss_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        gpu_gib = torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else None
        conn.send(("done", (dt, tokens, rss_gib, gpu_gib)))


class Worker:
    def __init__(self, system, model_path, dtype, device):
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_worker, args=(system, model_path, dtype, device, child), daemon=True)
        self.proc.start()
        kind, _ = self.conn.recv()
        assert kind == "ready"

    def run(self, prompt_ids, max_new):
        self.conn.send((prompt_ids, max_new))
        kind, result = self.conn.recv()
        return result

    def close(self):
        self.conn.send(None)
        self.proc.join(timeout=60)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default=None, help="target folder (default: the fetched Qwen2.5-Coder-1.5B)")
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 8])
    ap.add_argument("--batch1-prompts", type=int, default=2, help="prompts timed one at a time at batch 1")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--name", default="engine", help="result file name under bench/results/")
    args = ap.parse_args(argv)

    from common.models.fetch import TARGET_MODEL, is_fetched, model_path
    from common.tokenizer import encode_prompt, load_tokenizer
    path = args.model or str(model_path(TARGET_MODEL))
    if args.model is None and not is_fetched(TARGET_MODEL):
        print("bench-engine: the target model is not fetched; run `make models`", file=sys.stderr)
        return 2
    tok = load_tokenizer(path)
    prompts = [encode_prompt(tok, text, chat) for _, _, text, chat in PROMPTS]

    rows, goals = [], []
    for dtype in args.dtypes:
        print(f"[{dtype}] starting workers…", flush=True)
        t0 = time.perf_counter()
        workers = {"transformers generate": Worker("hf", path, dtype, args.device),
                   "specd engine": Worker("ours", path, dtype, args.device)}
        print(f"[{dtype}] both systems loaded in {time.perf_counter() - t0:.0f}s", flush=True)
        for w in workers.values():                                   # warm-up
            w.run([prompts[0]], 8)
        for bs in args.batch_sizes:
            groups = [[p] for p in prompts[:args.batch1_prompts]] if bs == 1 else [prompts[:bs]]
            times = {name: [] for name in workers}
            outputs, mem = {}, {}
            for rep in range(args.reps):
                for name, w in workers.items():                       # interleaved: A B A B A B
                    total = 0.0
                    for g in groups:
                        dt, toks, rss, gpu = w.run(g, args.max_tokens)
                        total += dt
                        outputs.setdefault(name, []).append(toks)
                        mem[name] = (rss, gpu)
                    n_tokens = sum(len(g) for g in groups) * args.max_tokens
                    times[name].append(n_tokens / total)
                    print(f"[{dtype}] batch {bs} rep {rep + 1}/{args.reps} {name}: {n_tokens / total:.2f} tokens/s",
                          flush=True)
            hf_name, ours_name = list(workers)
            same = outputs[hf_name][: len(groups)] == outputs[ours_name][: len(groups)]
            for name in workers:
                s = Stat.of(times[name])
                rows.append({"system": name, "dtype": dtype, "batch": bs, "tokens_per_s": s.median,
                             "tokens_per_s_min": s.min, "tokens_per_s_max": s.max,
                             "ratio_vs_hf": s.median / Stat.of(times[hf_name]).median,
                             "peak_rss_gib": mem[name][0], "peak_gpu_gib": mem[name][1],
                             "same_tokens_as_hf": same if name == ours_name else None})
            ratio = Stat.of(times[ours_name]).median / Stat.of(times[hf_name]).median
            target = 1.0 if bs == 1 else 1.5
            goals.append(goal(f"ours_vs_hf_{dtype}_batch{bs}", ratio, target))
        for w in workers.values():
            w.close()

    print()
    print_table(rows, [("system", "system", "s"), ("dtype", "dtype", "s"), ("batch", "batch", "d"),
                       ("tokens_per_s", "tok/s (median)", ".2f"), ("tokens_per_s_min", "min", ".2f"),
                       ("tokens_per_s_max", "max", ".2f"), ("ratio_vs_hf", "ours/HF", ".2f"),
                       ("peak_rss_gib", "peak RSS GiB", ".2f")])
    print_goals(goals)
    out = write_result("engine", {"target": path, "device": args.device, "max_tokens": args.max_tokens,
                                  "prompts": len(prompts), "batch1_prompts": args.batch1_prompts,
                                  "reps": args.reps, "dtypes": args.dtypes}, rows, goals, args.device, args.name)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
