"""`specd demo` (services stage): the real pair as three local processes, prompts streamed through the gateway."""
from __future__ import annotations

import tempfile
import time
from pathlib import Path

from common.distributed import free_port
from gateway.client import SpecdClient
from scripts.dev.demo_prompts import DEMO_PROMPTS
from scripts.dev.topology import LocalTopology


def run_services_demo(target: str, draft: str, dtype: str = "bfloat16", tp: int = 2, max_tokens: int = 96) -> None:
    logs = Path(tempfile.mkdtemp(prefix="specd-demo-"))
    ports = (free_port(), free_port(), free_port())
    print(f"starting verifier (TP={tp}, {dtype}), draft and gateway as local processes; logs in {logs} …", flush=True)
    t0 = time.perf_counter()
    with LocalTopology(target, draft, tp=tp, dtype=dtype, ports=ports, k="auto", log_dir=logs) as topo:
        print(f"all three SERVING after {time.perf_counter() - t0:.0f}s (gateway 127.0.0.1:{topo.gateway_port})",
              flush=True)
        with SpecdClient(f"127.0.0.1:{topo.gateway_port}") as client:
            for name, prompt, chat in DEMO_PROMPTS:
                print(f"\n=== {name} ===\n{prompt}\n--- streamed completion ---", flush=True)
                t = time.perf_counter()
                tokens = 0
                for chunk in client.stream(prompt, max_tokens=max_tokens, use_chat_template=chat):
                    print(chunk.text, end="", flush=True)
                    tokens += len(chunk.token_ids)
                    last = chunk
                dt = time.perf_counter() - t
                s = last.stats
                print(f"\n--- {tokens} tokens in {dt:.1f}s = {tokens / dt:.1f} tokens/s; finish={last.finish_reason}; "
                      f"rounds {s.rounds}, acceptance {s.acceptance_rate:.0%}, mean acceptance length "
                      f"{s.mean_acceptance_length:.2f}, draft {s.draft_ms:.0f} ms / verify {s.verify_ms:.0f} ms, "
                      f"fallback rounds {s.fallback_rounds}")
    print("\ntopology stopped")
