"""The draft service's engine: proposals from the full context, with a soft, LRU-bounded KV cache.

Every Propose carries the whole committed context, so correctness never depends on what this replica has
cached: the cache only saves recomputation. A request's sequence is found by its request id; the longest
prefix its KV shares with the new context is kept (rejected drafts fall away) and only the rest is fed.
Least recently used sequences are evicted past `max_cached_sequences`, or when the KV cache runs out.
"""
from __future__ import annotations

import threading
import time
from collections import OrderedDict

from common.errors import KVCacheExhaustedError
from common.spec.draft_model_proposer import DraftModelProposer
from common.spec.proposal import DraftProposal
from common.spec.proposer import ProposeRequest
from common.spec.sampling import SamplingParams


class Drafter:
    def __init__(self, runner, k_max: int = 8, max_cached_sequences: int = 64, max_support: int = 32):
        self.runner = runner
        self.k_max = k_max
        self.max_cached_sequences = max_cached_sequences
        self.proposer = DraftModelProposer(runner, max_support=max_support)
        self.vocab_size = runner.model_config.vocab_size
        self.max_model_len = runner.max_model_len
        self._seq_of: OrderedDict[str, int] = OrderedDict()     # request id -> sequence, LRU order
        self._next_seq = 1
        self._lock = threading.Lock()                           # one proposal at a time on this model

    def propose(self, request_id: str, context: list[int], k: int, params: SamplingParams,
                round_index: int) -> tuple[DraftProposal, int, float]:
        """-> (proposal, context tokens served from the soft cache, compute seconds)."""
        self._validate(context, k)
        with self._lock:
            t = time.perf_counter()
            seq = self._sequence_for(request_id)
            cached_before = self.proposer.cached_prefix(seq, context)
            request = ProposeRequest(seq, list(context), k, params, round_index)
            try:
                [proposal] = self.proposer.propose([request])
            except KVCacheExhaustedError:
                self._evict(keep=seq, all_but_one=True)          # make room; this sequence is recomputed
                cached_before = 0
                [proposal] = self.proposer.propose([request])
            self._evict(keep=seq)
            return proposal, cached_before, time.perf_counter() - t

    def _validate(self, context: list[int], k: int) -> None:
        if not context:
            raise ValueError("context_token_ids: empty")
        if not 1 <= k <= self.k_max:
            raise ValueError(f"k={k}: must be in [1, {self.k_max}]")
        if any(not 0 <= t < self.vocab_size for t in context):
            raise ValueError(f"context_token_ids: token id outside the vocabulary [0, {self.vocab_size})")
        if len(context) + k > self.max_model_len:
            raise ValueError(f"context_token_ids: {len(context)} tokens + k={k} exceeds "
                             f"max_model_len={self.max_model_len}")

    def _sequence_for(self, request_id: str) -> int:
        if request_id and request_id in self._seq_of:
            self._seq_of.move_to_end(request_id)
            return self._seq_of[request_id]
        seq = self._next_seq
        self._next_seq += 1
        self._seq_of[request_id or f"anonymous-{seq}"] = seq
        return seq

    def _evict(self, keep: int, all_but_one: bool = False) -> None:
        limit = 1 if all_but_one else self.max_cached_sequences
        while len(self._seq_of) > limit:
            rid, seq = next(iter(self._seq_of.items()))
            if seq == keep:
                self._seq_of.move_to_end(rid)
                continue
            del self._seq_of[rid]
            self.proposer.release(seq)

    @property
    def cached_sequences(self) -> int:
        return len(self._seq_of)
