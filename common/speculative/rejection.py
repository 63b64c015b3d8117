"""Exact speculative sampling (Leviathan et al. 2023; Chen et al. 2023), batched over sequences.

Vocabulary, used throughout specd:
- *accepted* tokens: drafts d_1..d_n that passed the test;
- the *recovered* token: drawn from norm(max(0, p_{n+1} − q′_{n+1})) at the first rejection;
- the *bonus* token: drawn from p_{K+1} when all K drafts are accepted.
Every round therefore emits n + 1 tokens. p are the target's sampling distributions (sampling.py), q′ the
draft's. Accepting d_i with probability min(1, p_i(d_i) / q′_i(d_i)) and resampling from the residual makes
each emitted token distributed exactly as p, whatever q′ is. Greedy: accept while d_i == argmax p_i.
p_i includes the penalties for row i's history: the committed tokens, then d_1..d_{i-1} (penalties.py).
When the request asks for logprobs, the outcome carries the target's for every emitted token (logprobs.py).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from common.speculative.logprobs import token_logprobs
from common.speculative.outcome import VerifyOutcome
from common.speculative.params import SamplingParams
from common.speculative.penalties import TokenHistory, penalized_logits
from common.speculative.proposal import DraftProposal, SparseDistribution
from common.speculative.sampling import (PURPOSE_ACCEPT, PURPOSE_RESAMPLE, make_generator, sample_from,
                                         target_distribution, uniform)


@dataclass(slots=True)
class VerifyInput:
    logits: torch.Tensor           # [K+1, vocab] target logits at the positions of d_1..d_K and the bonus
    proposal: DraftProposal
    params: SamplingParams
    round_index: int = 0
    position: int = 0              # absolute position of d_1 in the sequence (keys the random streams)
    history: TokenHistory | None = None    # the committed tokens before d_1 (needed when params.penalized)


def dense_distribution(dist: SparseDistribution, vocab_size: int) -> torch.Tensor:
    """q′ at one position as a dense row [vocab] (float32, zero off its support)."""
    q = torch.zeros(vocab_size, dtype=torch.float32)
    q[torch.tensor(dist.token_ids, dtype=torch.long)] = torch.tensor(dist.probs, dtype=torch.float32)
    return q


class RejectionSampler:
    def __call__(self, batch: list[VerifyInput]) -> list[VerifyOutcome]:
        return [self.verify_one(x) for x in batch]

    def verify_one(self, x: VerifyInput) -> VerifyOutcome:
        k = x.proposal.k
        if x.logits.shape[0] != k + 1:
            raise ValueError(f"need K+1={k + 1} rows of target logits, got {x.logits.shape[0]}")
        out = self._decide(x)
        if x.params.logprobs is not None:
            out.logprobs = token_logprobs(x.logits, x.params, x.history, out.emitted)
        return out

    def _decide(self, x: VerifyInput) -> VerifyOutcome:
        k = x.proposal.k
        if x.params.greedy:
            return self._greedy(penalized_logits(x.logits, x.params, x.history, x.proposal.token_ids), x.proposal)
        p = target_distribution(x.logits, x.params, x.history, x.proposal.token_ids)     # [K+1, vocab]
        seed, r, pos0 = x.params.seed, x.round_index, x.position
        drafts, dists = x.proposal.token_ids, x.proposal.dists
        for i, d in enumerate(drafts):
            q_d = dists[i].probs[dists[i].token_ids.index(d)]            # q′_i(d_i) > 0 (validated)
            p_d = float(p[i, d])
            u = uniform(make_generator(seed, PURPOSE_ACCEPT, r, pos0 + i))
            if u * q_d < p_d:                                           # u < p/q′, without dividing
                continue
            residual = self.residual(p[i], dense_distribution(dists[i], p.shape[1]))
            total = float(residual.sum())
            # p_i ≠ q′_i whenever a rejection can happen, so the residual has mass; guard rounding anyway
            dist = residual / total if total > 0 else p[i]
            token = sample_from(dist, make_generator(seed, PURPOSE_RESAMPLE, r, pos0 + i))
            return VerifyOutcome(list(drafts[:i]), token, k)
        bonus = sample_from(p[k], make_generator(seed, PURPOSE_RESAMPLE, r, pos0 + k))
        return VerifyOutcome(list(drafts), bonus, k)

    @staticmethod
    def residual(p_i: torch.Tensor, q_i: torch.Tensor) -> torch.Tensor:
        """Unnormalised distribution of the recovered token: max(0, p_i − q′_i). [vocab]"""
        return (p_i - q_i).clamp_min(0)

    @staticmethod
    def _greedy(logits: torch.Tensor, proposal: DraftProposal) -> VerifyOutcome:
        """logits [K+1, vocab], already penalised."""
        target = logits.argmax(-1).tolist()                              # [K+1]
        n = 0
        while n < proposal.k and proposal.token_ids[n] == target[n]:
            n += 1
        return VerifyOutcome(list(proposal.token_ids[:n]), target[n], proposal.k)
