"""`make bench-draft-acceptance`: how often the target accepts a quantized draft's tokens against the bf16 draft's.

A quantized draft is cheaper per step; what it may cost is acceptance. Same int4 target (the fetched GGUF's Q4_K
blocks, the VNNI kernel where it runs), a fixed K = 4 so every round proposes the same number of tokens, greedy,
EOS ignored, the 8 bench prompts x 64 tokens; drafts in bf16, int8 and int4, one after another (one model set alive
at a time). Acceptance = accepted / drafted over all prompts; also the mean accepted tokens per round and the
draft's weight bytes.
"""
from __future__ import annotations

import argparse
import time

DRAFTS = ("none", "int8", "int4")


def measure(target: str, draft: str, draft_q: str, target_gguf: str | None, k: int, max_tokens: int,
            threads: int, prompts: list[tuple[str, list[int]]] | None = None) -> dict:
    """`prompts`: (name, token ids); by default the bench prompts through the target's tokenizer."""
    import torch
    torch.set_num_threads(threads)
    from bench.peers import model_bytes_per_token
    from bench.prompts import PROMPTS
    from common.llm import LLM
    from common.speculative.params import SamplingParams
    from common.tokenizer import encode_prompt
    with LLM(target, draft, num_speculative_tokens=k, dtype="bfloat16", kv_cache_memory_gib=0.5,
             quantization="int4", gguf=target_gguf, draft_quantization=draft_q) as llm:
        drafted = accepted = rounds = 0
        per_prompt = {}
        t = time.perf_counter()
        if prompts is None:
            prompts = [(name, encode_prompt(llm.tokenizer, text, chat)) for name, _, text, chat in PROMPTS]
        for name, ids in prompts:
            [out] = llm.generate([ids], SamplingParams(max_tokens=max_tokens, ignore_eos=True))
            s = out.stats
            drafted, accepted, rounds = drafted + s.drafted, accepted + s.accepted, rounds + s.rounds
            per_prompt[name] = s.accepted / max(s.drafted, 1)
        seconds = time.perf_counter() - t
        print(f"draft {draft_q}: {accepted}/{drafted} drafted tokens accepted in {seconds:.0f}s", flush=True)
        draft_bytes = model_bytes_per_token(llm.draft_runner.model)
    return {"draft": {"none": "bf16"}.get(draft_q, draft_q), "acceptance": accepted / max(drafted, 1),
            "accepted_per_round": accepted / max(rounds, 1), "drafted": drafted, "accepted": accepted,
            "draft_gb": draft_bytes / 1e9, "seconds": seconds, "per_prompt": per_prompt}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--drafts", nargs="+", default=list(DRAFTS), choices=DRAFTS)
    ap.add_argument("--name", default="draft_acceptance")
    args = ap.parse_args()
    from bench.report import fetched_pair, print_table, write_result
    from common.models.fetch import TARGET_MODEL, gguf_path
    pair = fetched_pair("bench-draft-acceptance")
    if pair is None:
        raise SystemExit(1)
    gguf = gguf_path(TARGET_MODEL)
    rows = [measure(*pair, q, str(gguf) if gguf.is_file() else None, args.k, args.max_tokens, args.threads)
            for q in args.drafts]
    base = rows[0]["acceptance"] if rows[0]["draft"] == "bf16" else None
    for r in rows:
        r["vs_bf16_draft"] = r["acceptance"] / base if base else None
    print_table(rows, [("draft", "draft", "s"), ("draft_gb", "draft GB/step", ".3f"),
                       ("acceptance", "acceptance", ".3f"), ("vs_bf16_draft", "vs bf16 draft", ".3f"),
                       ("accepted_per_round", "accepted/round", ".2f"), ("drafted", "drafted", "d")])
    out = write_result("draft_acceptance", {"k": args.k, "max_tokens": args.max_tokens, "threads": args.threads,
                                            "target": "int4 (GGUF Q4_K blocks)", "target_gguf": gguf.is_file()},
                       rows, [], "cpu", args.name)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
