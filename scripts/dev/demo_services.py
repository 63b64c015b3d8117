"""`specd demo` (services stage): the real pair as three local processes; each prompt decoded target-only (K=0) and
speculative (K=auto) through the same services, tokens/s side by side; then one call through the HTTP API with the
official `openai` package."""
from __future__ import annotations

import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from common.config import ModelConfig
from common.distributed import free_port
from gateway.client import SpecdClient
from scripts.dev.demo_prompts import DEMO_PROMPTS, HTTP_MESSAGES
from scripts.dev.topology import LocalTopology

# bench/results/services.json (2026-11-22, 2 cores, bf16, batch 1): the gateway with a TP=1 verifier ran 7.7
# tokens/s, with TP=2 6.2: two ranks on two cores share them with the draft and pay a collective every layer.
MEASURED_2_CORES = "bench-services on 2 cores, batch 1: TP=1 7.7 vs TP=2 6.2 tokens/s"


def choose_tp(cores: int, kv_heads: int) -> tuple[int, str]:
    """The verifier's TP degree for `cores` CPU cores, and why. One core stays for the draft; each rank wants at
    least 2 cores of its own (a CPU rank with 1 thread, plus a collective every layer, is slower than one rank
    using both), and TP must divide the KV heads."""
    for_verifier = max(1, cores - 1)
    tp = 1
    while (tp * 2) * 2 <= for_verifier and kv_heads % (tp * 2) == 0:
        tp *= 2
    if tp == 1:
        why = (f"TP=1: {cores} core(s); one rank using every core beats ranks that split them ({MEASURED_2_CORES}); "
               "TP=2 wants >= 5 cores: 2 per rank, 1 for the draft")
    else:
        why = f"TP={tp}: {cores} cores = {tp} ranks x >= 2 cores + 1 for the draft ({kv_heads} KV heads)"
    return tp, why


@dataclass(slots=True)
class Timed:
    """One decoded prompt: what came out and how long it took (request to last chunk)."""
    tokens: int
    seconds: float
    text: str
    acceptance: float = 0.0
    mean_acceptance_length: float = 1.0

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


def _ratio(spec: Timed, base: Timed) -> str:
    return f"{spec.tokens_per_s / base.tokens_per_s:.2f}x" if base.tokens_per_s else "-"


def speed_table(rows: list[tuple[str, Timed, Timed]]) -> str:
    """Target-only vs speculative per prompt, and over all prompts (total tokens / total time)."""
    head = ("prompt", "target-only tok/s", "speculative tok/s", "speedup", "acceptance", "same text")
    lines = [head]
    for name, base, spec in rows:
        lines.append((name, f"{base.tokens_per_s:.1f}", f"{spec.tokens_per_s:.1f}", _ratio(spec, base),
                      f"{spec.acceptance:.0%}", "yes" if base.text == spec.text else "no"))
    if rows:
        base_all = Timed(sum(b.tokens for _, b, _ in rows), sum(b.seconds for _, b, _ in rows), "")
        spec_all = Timed(sum(s.tokens for _, _, s in rows), sum(s.seconds for _, _, s in rows), "")
        lines.append(("all", f"{base_all.tokens_per_s:.1f}", f"{spec_all.tokens_per_s:.1f}",
                      _ratio(spec_all, base_all), "", ""))
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    out = []
    for j, line in enumerate(lines):
        out.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths))))
        if j == 0 or (rows and j == len(rows)):
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)


def _stream(client: SpecdClient, prompt: str, chat: bool, k, max_tokens: int) -> Timed:
    t = time.perf_counter()
    tokens, parts, last = 0, [], None
    for chunk in client.stream(prompt, max_tokens=max_tokens, use_chat_template=chat, num_speculative_tokens=k):
        print(chunk.text, end="", flush=True)
        parts.append(chunk.text)
        tokens += len(chunk.token_ids)
        last = chunk
    out = Timed(tokens, time.perf_counter() - t, "".join(parts))
    if last is not None and last.stats.drafted:
        out.acceptance, out.mean_acceptance_length = last.stats.acceptance_rate, last.stats.mean_acceptance_length
    return out


def compare(client: SpecdClient, prompts, max_tokens: int, k="auto") -> list[tuple[str, Timed, Timed]]:
    """Each (name, prompt, chat) decoded greedily target-only, then speculative with `k`, streamed; one row per
    prompt."""
    rows = []
    client.generate(prompts[0][1], max_tokens=4, use_chat_template=prompts[0][2])    # first-call costs
    for name, prompt, chat in prompts:
        # Both runs then find the prompt in the prefix caches: neither pays a cold prefill the other skips.
        client.generate(prompt, max_tokens=2, use_chat_template=chat)
        print(f"\n=== {name} ===\n{prompt}", flush=True)
        print("--- target only (num_speculative_tokens=0) ---", flush=True)
        base = _stream(client, prompt, chat, 0, max_tokens)
        print(f"\n--- {base.tokens} tokens in {base.seconds:.1f}s = {base.tokens_per_s:.1f} tokens/s", flush=True)
        print(f"--- speculative (the draft proposes, the target verifies; K={k}) ---", flush=True)
        spec = _stream(client, prompt, chat, k, max_tokens)
        print(f"\n--- {spec.tokens} tokens in {spec.seconds:.1f}s = {spec.tokens_per_s:.1f} tokens/s, acceptance "
              f"{spec.acceptance:.0%}, mean acceptance length {spec.mean_acceptance_length:.2f}", flush=True)
        rows.append((name, base, spec))
    return rows


def http_call(base_url: str, messages=HTTP_MESSAGES, max_tokens: int = 64, api_key: str | None = None) -> dict:
    """One streamed chat completion through the gateway's OpenAI-compatible API with the official `openai`
    package (K=auto through `extra_body`); returns the text, usage and spec_decode stats it printed."""
    from openai import OpenAI
    client = OpenAI(base_url=base_url, api_key=api_key or "unused-without-SPECD_API_KEYS", max_retries=0)
    model = client.models.list().data[0].id
    print(f"\n=== the same gateway through its OpenAI-compatible API (openai package, model {model!r}) ===")
    print("\n".join(f"[{m['role']}] {m['content']}" for m in messages), flush=True)
    print("--- streamed reply ---", flush=True)
    t = time.perf_counter()
    parts, stats, usage = [], None, None
    stream = client.chat.completions.create(model=model, messages=messages, max_tokens=max_tokens, temperature=0,
                                            stream=True, stream_options={"include_usage": True},
                                            extra_body={"num_speculative_tokens": -1})
    for chunk in stream:
        for choice in chunk.choices:
            parts.append(choice.delta.content or "")
            print(parts[-1], end="", flush=True)
            stats = (choice.model_extra or {}).get("spec_decode") or stats
        usage = chunk.usage or usage
    dt = time.perf_counter() - t
    tokens = usage.completion_tokens if usage else 0
    line = f"\n--- {tokens} tokens in {dt:.1f}s = {tokens / dt:.1f} tokens/s"
    if stats:
        line += (f"; spec_decode: {stats['num_accepted_draft_tokens']}/{stats['num_draft_tokens']} drafts accepted, "
                 f"mean acceptance length {stats['mean_acceptance_length']:.2f}")
    print(line, flush=True)
    return {"text": "".join(parts), "completion_tokens": tokens, "spec_decode": stats}


def run_services_demo(target: str, draft: str, dtype: str = "bfloat16", tp: int | None = None,
                      max_tokens: int = 96, prompts=DEMO_PROMPTS, messages=HTTP_MESSAGES, k="auto") -> list:
    cores = len(os.sched_getaffinity(0))
    if tp is None:
        tp, why = choose_tp(cores, ModelConfig.from_pretrained(target).num_kv_heads)
    else:
        why = f"TP={tp}: set by --tp"
    logs = Path(tempfile.mkdtemp(prefix="specd-demo-"))
    ports = (free_port(), free_port(), free_port())
    http_port = free_port()
    print(f"verifier {why}", flush=True)
    print(f"starting verifier (TP={tp}, {dtype}), draft and gateway (gRPC + HTTP) as local processes; logs in "
          f"{logs} …", flush=True)
    t0 = time.perf_counter()
    with LocalTopology(target, draft, tp=tp, dtype=dtype, ports=ports, k="auto", log_dir=logs,
                       http_port=http_port) as topo:
        print(f"all three SERVING after {time.perf_counter() - t0:.0f}s (gateway gRPC 127.0.0.1:{topo.gateway_port}, "
              f"HTTP http://127.0.0.1:{http_port}/v1)", flush=True)
        with SpecdClient(f"127.0.0.1:{topo.gateway_port}") as client:
            rows = compare(client, prompts, max_tokens, k)
        print(f"\nsame services, same prompts, greedy: target-only vs speculative\n{speed_table(rows)}", flush=True)
        http_call(f"http://127.0.0.1:{http_port}/v1", messages, max_tokens=min(max_tokens, 64))
    print("\ntopology stopped")
    return rows
