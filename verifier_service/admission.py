"""KV-aware admission for the verifier: new sessions start only when their blocks are free, or wait, or are refused.

A new session (round 0, or a re-prefill of a lost one) is admitted when the blocks of its first pass (committed
tokens + K drafts) plus a watermark for the growth of every running session are free. Otherwise it waits in a
bounded list, resumed sessions (re-prefills, round > 0: their requests already ran) ahead of new ones, each group
in arrival order; a brand-new session that finds the list full, or that could never fit the whole cache, is
refused at once (RESOURCE_EXHAUSTED) before it holds anything. The list is retried after every pass and tick.
Block counting only: the engine (verifier_service/engine.py) creates the sessions and runs the passes.
"""
from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from common.engine.batch_worker import Job
from common.errors import KVCacheExhaustedError
from common.kv.block_allocator import blocks_for


@dataclass(slots=True)
class Waiter:
    """A new session's first call, waiting for KV blocks (its future is already running: only this list sets it)."""
    job: Job                        # item: a VerifyCall
    blocks: int                     # blocks its first pass needs
    resumed: bool                   # a re-prefill (round > 0): waits even when the list is full
    since: float = field(default_factory=time.monotonic)

    @property
    def session_id(self) -> str:
        return self.job.item.session_id


@dataclass(slots=True)
class AdmissionPolicy:
    num_blocks: int                 # the whole KV cache
    block_size: int
    watermark_blocks: int           # kept free after admitting a session, for running sessions to grow into
    max_waiting: int = 64           # brand-new sessions waiting for blocks; one more is refused at once
    max_wait_s: float = 60.0        # a waiter older than this is refused (RESOURCE_EXHAUSTED)

    def __post_init__(self):
        if self.num_blocks < 1 or self.block_size < 1:
            raise ValueError(f"num_blocks={self.num_blocks}, block_size={self.block_size}: both must be >= 1")
        if not 0 <= self.watermark_blocks < self.num_blocks:
            raise ValueError(f"watermark_blocks={self.watermark_blocks}: must be in [0, {self.num_blocks})")
        if self.max_waiting < 0:
            raise ValueError(f"max_waiting={self.max_waiting}: must be >= 0")
        if not self.max_wait_s > 0:
            raise ValueError(f"max_wait_s={self.max_wait_s}: must be > 0")

    @classmethod
    def for_cache(cls, num_blocks: int, block_size: int, k_max: int, **kw) -> AdmissionPolicy:
        """Watermark: 1% of the cache, and at least one round (K_max + 1 tokens) of growth, as vLLM keeps 1%."""
        watermark = max(math.ceil(0.01 * num_blocks), blocks_for(k_max + 1, block_size))
        return cls(num_blocks, block_size, min(watermark, num_blocks - 1), **kw)


class AdmissionQueue:
    """The waiting new sessions, in the order they are admitted (resumed first, then by arrival)."""

    def __init__(self, policy: AdmissionPolicy):
        self.policy = policy
        self._resumed: deque[Waiter] = deque()
        self._new: deque[Waiter] = deque()
        self.refused = 0                                # brand-new sessions refused (tests read it)

    def __len__(self) -> int:
        return len(self._resumed) + len(self._new)

    def __iter__(self) -> Iterator[Waiter]:
        yield from self._resumed
        yield from self._new

    def offer(self, job: Job, tokens: int) -> None:
        """Queue a new session's first call of `tokens` tokens; raises KVCacheExhaustedError if it can never fit."""
        p, call = self.policy, job.item
        blocks = blocks_for(tokens, p.block_size)
        if blocks > p.num_blocks:
            self.refused += 1
            raise KVCacheExhaustedError(
                f"session {call.session_id!r}: committed_len={call.committed_len} + K={call.proposal.k} tokens need "
                f"{blocks} KV blocks of {p.block_size} tokens, the whole cache holds {p.num_blocks}: raise "
                "--kv-cache-gib or send a shorter prompt")
        (self._resumed if call.round > 0 else self._new).append(Waiter(job, blocks, call.round > 0))

    def admit(self, free_blocks: int, free_slots: int, idle: bool) -> list[Waiter]:
        """Take waiters from the head while each fits (`idle`: no session holds KV, so no watermark is needed).

        Stops at the first that does not fit, so a long prompt is not starved by short ones behind it."""
        admitted: list[Waiter] = []
        seen: set[str] = set()
        for group in (self._resumed, self._new):
            while group and free_slots > 0:
                w = group[0]
                if w.session_id in seen:                # a retried first call: matched again next pass
                    break
                reserve = 0 if idle and not admitted else self.policy.watermark_blocks
                if w.blocks + reserve > free_blocks:
                    return admitted
                group.popleft()
                admitted.append(w)
                seen.add(w.session_id)
                free_blocks -= w.blocks
                free_slots -= 1
            if group:
                return admitted
        return admitted

    def overflow(self) -> list[Waiter]:
        """Brand-new waiters past `max_waiting` (the latest arrivals), removed: to be refused."""
        out = []
        while len(self._new) > self.policy.max_waiting:
            out.append(self._new.pop())
        self.refused += len(out)
        return out

    def take(self, pred: Callable[[Waiter], bool]) -> list[Waiter]:
        """Remove and return the waiters matching `pred` (released, timed out, or whose session now exists)."""
        out = []
        for group in (self._resumed, self._new):
            keep = [w for w in group if not pred(w)]
            out += [w for w in group if pred(w)]
            group.clear()
            group.extend(keep)
        return out

    def timed_out(self, now: float | None = None) -> list[Waiter]:
        now = time.monotonic() if now is None else now
        return self.take(lambda w: now - w.since > self.policy.max_wait_s)

    def full_message(self, w: Waiter, free_blocks: int) -> str:
        p = self.policy
        return (f"session {w.session_id!r}: not admitted: {len(self._new)} new sessions already wait for KV blocks "
                f"(max_waiting={p.max_waiting}); it needs {w.blocks} blocks + {p.watermark_blocks} watermark, "
                f"{free_blocks} of {p.num_blocks} are free after this pass: retry later")
