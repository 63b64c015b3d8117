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
CONTEXT = list(range(10, 42))           # 32 tokens of context, prefilled once


def measure_pass_costs(engine, max_tokens: int = 9, reps: int = 3) -> list[float]:
    """[t(n) / t(1) for n = 1..max_tokens] for one sequence on `engine` (a ModelRunner or TPExecutor), each the
    median of `reps` passes; the probe sequence is rolled back after each pass and freed at the end."""
    engine.forward([SequenceChunk(PROBE_SEQ, CONTEXT)])
    try:
        engine.forward([SequenceChunk(PROBE_SEQ, CONTEXT[:max_tokens], num_logits=max_tokens)])   # warm-up
        engine.truncate(PROBE_SEQ, len(CONTEXT))
        seconds = []
        for n in range(1, max_tokens + 1):
            samples = []
            for _ in range(reps):
                t = time.perf_counter()
                engine.forward([SequenceChunk(PROBE_SEQ, CONTEXT[:n], num_logits=n)])
                samples.append(time.perf_counter() - t)
                engine.truncate(PROBE_SEQ, len(CONTEXT))
            seconds.append(statistics.median(samples))
    finally:
        engine.free(PROBE_SEQ)
    return [round(s / seconds[0], 3) for s in seconds]


def describe(ratios: list[float]) -> str:
    return ", ".join(f"{n}: {r:.2f}x" for n, r in enumerate(ratios, start=1))
