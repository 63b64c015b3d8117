"""Target-only greedy decoding of a batch of prompts on the paged engine (prefill once, then 1-token steps)."""
from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from common.engine.forward_io import SequenceChunk

_seq_ids = itertools.count(1 << 20)


@dataclass(slots=True)
class GreedyResult:
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str = "length"          # "length" | "stop"


def greedy_generate(executor, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                    eos_token_ids: Sequence[int] = (),
                    on_step: Callable[[int], None] | None = None) -> list[GreedyResult]:
    """Greedy-decode every prompt together; a finished sequence leaves the batch and frees its KV at once."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens}: must be >= 1")
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    ids = [next(_seq_ids) for _ in prompts]
    results = [GreedyResult() for _ in prompts]
    eos = set(eos_token_ids)
    try:
        logits = executor.forward([SequenceChunk(i, list(p)) for i, p in zip(ids, prompts)]).logits
        active = list(range(len(prompts)))
        step = 0
        while active:
            still = []
            for slot, row in zip(active, logits):
                token = int(row[-1].argmax())
                results[slot].token_ids.append(token)
                if token in eos:
                    results[slot].finish_reason = "stop"
                    executor.free(ids[slot])
                elif len(results[slot].token_ids) >= max_new_tokens:
                    executor.free(ids[slot])
                else:
                    still.append(slot)
            active = still
            step += 1
            if on_step:
                on_step(step)
            if active:
                logits = executor.forward([SequenceChunk(ids[s], [results[s].token_ids[-1]]) for s in active]).logits
    finally:
        for i in ids:
            executor.free(i)
    return results
