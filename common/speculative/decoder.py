"""The round loop of speculative decoding, in process: propose → verify (one batched target pass) → accept.

A request's committed tokens are its prompt plus what it has emitted. The target's KV holds all of them but
the *pending* ones (the last emitted token, or the whole prompt before the first round): a round feeds
pending + d_1..d_K in one chunk and reads K+1 rows of logits, so prefill, plain decoding (K = 0) and
verification are the same call. After n acceptances the target KV is cut back to committed + n (the
recovered/bonus token becomes the next round's pending token). Penalties see each request's committed tokens
(prompt + output) as its history; the sampler adds the target's logprobs to the outcome when they are asked for.
"""
from __future__ import annotations

import time

from common.engine.model_runner import SequenceChunk
from common.speculative.adaptive_k import CostModel
from common.speculative.penalties import TokenHistory
from common.speculative.proposal import DraftProposal
from common.speculative.proposers import ProposeInput
from common.speculative.rejection import RejectionSampler, VerifyInput
from common.speculative.request import Request, StopCheck, StopConditions, observe_pass_costs
from common.speculative.stats import RequestStats

__all__ = ["Request", "RequestStats", "SpeculativeDecoder"]


class SpeculativeDecoder:
    def __init__(self, target, proposer=None, eos_token_ids=(), max_model_len: int | None = None,
                 costs: CostModel | None = None, stop_check: StopCheck | None = None):
        self.target = target
        self.proposer = proposer
        self.sampler = RejectionSampler()
        self.max_model_len = max_model_len or target.runner.max_model_len
        self.stop = StopConditions(frozenset(eos_token_ids), self.max_model_len, stop_check)
        self.costs = costs or CostModel()

    def run(self, requests: list[Request], proposer=..., costs: CostModel | None = None) -> None:
        """Decode every request to completion, batching all unfinished ones in each round.

        `proposer` / `costs` override the decoder's own for this call (None proposer = target only).
        """
        saved = self.proposer, self.costs
        if proposer is not ...:
            self.proposer = proposer
        if costs is not None:
            self.costs = costs
        try:
            active = [r for r in requests if not r.finished]
            while active:
                self.step(active)
                active = [r for r in active if not r.finished]
        finally:
            for r in requests:
                self.release(r)
            self.proposer, self.costs = saved

    def release(self, r: Request) -> None:
        self.target.free(r.seq_id)
        if self.proposer is not None:
            self.proposer.release(r.seq_id)

    def step(self, batch: list[Request]) -> None:
        ks = [r.choose_k(self.max_model_len, self.proposer is not None) for r in batch]
        proposals, draft_s = self._propose(batch, ks)
        chunks = [SequenceChunk(r.seq_id, r.pending + p.token_ids, num_logits=p.k + 1)
                  for r, p in zip(batch, proposals)]
        t = time.perf_counter()
        logits = self.target.forward(chunks).logits
        outcomes = self.sampler([VerifyInput(row, p, r.params, r.stats.rounds, r.num_tokens, _history(r))
                                 for r, p, row in zip(batch, proposals, logits)])
        verify_s = time.perf_counter() - t
        timed_draft = draft_s if getattr(self.proposer, "has_model", True) else None
        observe_pass_costs(self.costs, batch, draft_steps=max(ks), draft_s=timed_draft,
                           verify_tokens=max(p.k for p in proposals) + 1, verify_s=verify_s)
        for r, p, out in zip(batch, proposals, outcomes):
            r.stats.verify_s += verify_s
            if p.k:
                r.stats.draft_s += draft_s or 0.0
            self.target.truncate(r.seq_id, r.num_tokens + out.num_accepted)   # drop rejected drafts' K/V
            r.apply(out, self.stop)
            if r.finished:
                self.release(r)

    def _propose(self, batch: list[Request], ks: list[int]) -> tuple[list[DraftProposal], float | None]:
        """One proposal per request (empty where K = 0) and the seconds the proposer took (None: not called)."""
        proposals = [DraftProposal([], None if r.params.greedy else []) for r in batch]
        wanted = [ProposeInput(r.seq_id, r.context, k, r.params, r.stats.rounds, prompt_len=len(r.prompt_ids))
                  for r, k in zip(batch, ks) if k > 0]
        if not wanted:
            return proposals, None
        t = time.perf_counter()
        made = iter(self.proposer.propose(wanted))
        draft_s = time.perf_counter() - t
        for i, k in enumerate(ks):
            if k > 0:
                proposals[i] = next(made)
        return proposals, draft_s


def _history(r: Request) -> TokenHistory | None:
    """The committed tokens the penalties count (built only when the request sets one)."""
    return TokenHistory(r.context, len(r.prompt_ids)) if r.params.penalized else None
