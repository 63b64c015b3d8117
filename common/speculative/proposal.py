"""A draft's proposal for one sequence: K token ids and, per position, the distribution q′ they came from.

Torch-free (the gateway handles proposals without loading torch): the rejection sampler builds the dense q′
rows it needs, and a proposer builds the sparse form from its own dense rows (`from_dense`, tensor methods only).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from common.validation import check_token_ids

PROB_SUM_TOLERANCE = 1e-3


@dataclass(slots=True)
class SparseDistribution:
    """q′ at one position, sent exactly on its support: token ids and their probabilities (summing to 1)."""
    token_ids: list[int]
    probs: list[float]

    def validate(self, vocab_size: int, where: str) -> None:
        if len(self.token_ids) != len(self.probs) or not self.token_ids:
            raise ValueError(f"{where}: draft distribution needs as many probabilities as token ids (>= 1), "
                             f"got {len(self.token_ids)} ids and {len(self.probs)} probs")
        if len(set(self.token_ids)) != len(self.token_ids):
            raise ValueError(f"{where}: draft distribution repeats a token id")
        check_token_ids(f"{where}: draft distribution token_ids", self.token_ids, vocab_size)
        if any(not (p >= 0) for p in self.probs):           # also catches NaN
            raise ValueError(f"{where}: draft probabilities must be >= 0")
        total = sum(self.probs)
        if abs(total - 1.0) > PROB_SUM_TOLERANCE:
            raise ValueError(f"{where}: draft probabilities sum to {total:.6f}, must be 1 ± {PROB_SUM_TOLERANCE}")

    @classmethod
    def from_dense(cls, q) -> "SparseDistribution":  # q: a torch.Tensor [vocab]
        ids = q.nonzero().squeeze(-1)
        return cls(ids.tolist(), q[ids].tolist())


@dataclass(slots=True)
class DraftProposal:
    """K drafted tokens d_1..d_K; `dists[i]` is q′_i, absent for greedy proposals (ids only)."""
    token_ids: list[int] = field(default_factory=list)
    dists: list[SparseDistribution] | None = None
    cached_tokens: int = 0         # context tokens the proposer's KV already held (not recomputed)
    guessed_token_id: int | None = None    # pre-drafts: the token appended to the context before drafting

    @property
    def k(self) -> int:
        return len(self.token_ids)

    def validate(self, vocab_size: int, greedy: bool) -> None:
        check_token_ids("draft_token_ids", self.token_ids, vocab_size, allow_empty=True)
        if greedy:
            return
        if self.dists is None or len(self.dists) != self.k:
            raise ValueError(f"sampled proposals need one draft distribution per drafted token "
                             f"(K={self.k}, got {0 if self.dists is None else len(self.dists)})")
        for i, (tok, dist) in enumerate(zip(self.token_ids, self.dists)):
            dist.validate(vocab_size, f"position {i}")
            if tok not in dist.token_ids or dist.probs[dist.token_ids.index(tok)] <= 0:
                raise ValueError(f"position {i}: drafted token {tok} has zero draft probability")
