"""Prompt-lookup proposer: find the latest earlier occurrence of the context's last n tokens, propose what followed.

No model; each proposed token is a point mass (q′ = 1 on it), which keeps sampling exact: the rejection
sampler accepts d with probability p(d) and otherwise resamples from p without d.
"""
from __future__ import annotations

from common.speculative.proposal import DraftProposal, SparseDistribution
from common.speculative.proposers import ProposeInput


class NgramProposer:
    has_model = False                    # proposing costs ~nothing: adaptive K weighs only the verify pass

    def __init__(self, max_n: int = 4, min_n: int = 1, window: int = 4096):
        if not 1 <= min_n <= max_n:
            raise ValueError(f"ngram sizes: need 1 <= min_n={min_n} <= max_n={max_n}")
        self.max_n, self.min_n, self.window = max_n, min_n, window

    def propose(self, requests: list[ProposeInput]) -> list[DraftProposal]:
        return [self._one(r) for r in requests]

    def _one(self, r: ProposeInput) -> DraftProposal:
        ctx = r.context[-self.window:]
        tokens = self.lookup(ctx, r.k)
        dists = None if r.params.greedy else [SparseDistribution([t], [1.0]) for t in tokens]
        return DraftProposal(tokens, dists)

    def lookup(self, ctx: list[int], k: int) -> list[int]:
        for n in range(min(self.max_n, len(ctx) - 1), self.min_n - 1, -1):
            tail = ctx[-n:]
            # latest match first: recent text predicts the continuation best
            for start in range(len(ctx) - n - 1, -1, -1):
                if ctx[start:start + n] == tail:
                    follow = ctx[start + n:start + n + k]
                    if follow:
                        return follow
        return []

    def release(self, seq_id: int) -> None:
        pass
