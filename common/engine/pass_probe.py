"""What a pass of n tokens costs against a 1-token pass, measured at load on this processor and kernel path.

Speculation needs a (K+1)-token verify pass to cost little more than a 1-token decode pass. Whether it does depends
on the processor's matrix instructions and on the kernel (bf16 with avx512_bf16 or AMX is nearly flat up to ~8
rows; without them, and on the int8/int4 kernels, each extra row costs; `make bench-kernels` draws the curves).
Services measure it once at load, log it and report it in ModelInfo.pass_cost_ratio.
"""
from __future__ import annotations

import statistics
import time

from common.engine.forward_io import SequenceChunk

PROBE_SEQ = -2                          # a sequence id no request uses
CONTEXT_TOKENS = 32                     # at most: prefilled once; each measured pass is rolled back to it


def measure_pass_costs(engine, max_tokens: int = 9, reps: int = 3) -> list[float]:
    """[t(n) / t(1) for n = 1..max_tokens] (see measure_pass_seconds)."""
    seconds = measure_pass_seconds(engine, max_tokens, reps)
    return [round(s / seconds[0], 3) for s in seconds]


def measure_pass_seconds(engine, max_tokens: int = 9, reps: int = 3) -> list[float]:
    """[t(n) for n = 1..max_tokens] seconds for one sequence on `engine` (a ModelRunner or TPExecutor), each the
    median of `reps` passes after 32 tokens of context; the probe sequence is rolled back after each pass and freed
    at the end."""
    vocab = engine.model_config.vocab_size
    # Under one KV block of context: rolling back to it leaves no full block to publish to a prefix cache.
    n_context = max(1, min(CONTEXT_TOKENS, getattr(engine, "runner", engine).block_size - 1))
    tokens = [(10 + i) % vocab for i in range(n_context + max_tokens)]
    context, passes = tokens[:n_context], tokens[n_context:]
    engine.forward([SequenceChunk(PROBE_SEQ, context)])
    try:
        engine.forward([SequenceChunk(PROBE_SEQ, passes, num_logits=max_tokens)])       # warm-up
        engine.truncate(PROBE_SEQ, n_context)
        seconds = []
        for n in range(1, max_tokens + 1):
            samples = []
            for _ in range(reps):
                t = time.perf_counter()
                engine.forward([SequenceChunk(PROBE_SEQ, passes[:n], num_logits=n)])
                samples.append(time.perf_counter() - t)
                engine.truncate(PROBE_SEQ, n_context)
            seconds.append(statistics.median(samples))
    finally:
        engine.free(PROBE_SEQ)
    return seconds


def describe(ratios: list[float]) -> str:
    return ", ".join(f"{n}: {r:.2f}x" for n, r in enumerate(ratios, start=1))
