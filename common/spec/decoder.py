"""The round loop of speculative decoding, in process: propose → verify (one batched target pass) → accept.

A request's committed tokens are its prompt plus what it has emitted. The target's KV holds all of them but
the *pending* ones (the last emitted token, or the whole prompt before the first round): a round feeds
pending + d_1..d_K in one chunk and reads K+1 rows of logits, so prefill, plain decoding (K = 0) and
verification are the same call. After n acceptances the target KV is cut back to committed + n (the
recovered/bonus token becomes the next round's pending token).
"""
from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from common.engine.model_runner import SequenceChunk
from common.spec.adaptive_k import AdaptiveK, CostModel
from common.spec.proposal import DraftProposal
from common.spec.proposer import ProposeRequest
from common.spec.rejection import RejectionSampler, VerifyInput
from common.spec.sampling import SamplingParams

_seq_ids = itertools.count(1)


@dataclass(slots=True)
class SpecStats:
    rounds: int = 0
    drafted: int = 0
    accepted: int = 0
    accepted_per_position: list[int] = field(default_factory=list)
    drafted_per_position: list[int] = field(default_factory=list)
    k_chosen: list[int] = field(default_factory=list)
    per_round_accepted: list[int] = field(default_factory=list)
    draft_time_s: float = 0.0
    verify_time_s: float = 0.0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def mean_acceptance_length(self) -> float:
        """Tokens emitted per verify round: 1 + accepted / rounds."""
        return 1 + self.accepted / self.rounds if self.rounds else 0.0

    def record(self, k: int, num_accepted: int) -> None:
        self.rounds += 1
        self.drafted += k
        self.accepted += num_accepted
        self.k_chosen.append(k)
        self.per_round_accepted.append(num_accepted)
        while len(self.drafted_per_position) < k:
            self.drafted_per_position.append(0)
            self.accepted_per_position.append(0)
        for i in range(k):
            self.drafted_per_position[i] += 1
            self.accepted_per_position[i] += i < num_accepted

    def as_dict(self) -> dict:
        return {"rounds": self.rounds, "drafted": self.drafted, "accepted": self.accepted,
                "acceptance_rate": round(self.acceptance_rate, 4),
                "mean_acceptance_length": round(self.mean_acceptance_length, 4),
                "accepted_per_position": list(self.accepted_per_position),
                "drafted_per_position": list(self.drafted_per_position),
                "draft_time_s": round(self.draft_time_s, 4), "verify_time_s": round(self.verify_time_s, 4)}


@dataclass(slots=True)
class Request:
    prompt_ids: list[int]
    params: SamplingParams
    controller: AdaptiveK | None = None        # None: fixed K
    fixed_k: int = 0
    seq_id: int = field(default_factory=lambda: next(_seq_ids))
    output_ids: list[int] = field(default_factory=list)
    pending: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    stats: SpecStats = field(default_factory=SpecStats)

    def __post_init__(self):
        self.pending = list(self.prompt_ids)

    @property
    def context(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


# stop_check(request) -> True when the request's text now ends a generation (stop strings)
StopCheck = Callable[[Request], bool]


class SpeculativeDecoder:
    def __init__(self, target, proposer=None, eos_token_ids=(), max_model_len: int | None = None,
                 costs: CostModel | None = None, stop_check: StopCheck | None = None):
        self.target = target
        self.proposer = proposer
        self.sampler = RejectionSampler()
        self.eos = frozenset(eos_token_ids)
        self.max_model_len = max_model_len or target.runner.max_model_len
        self.costs = costs or CostModel()
        self.stop_check = stop_check

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
        ks = [self._choose_k(r) for r in batch]
        proposals = self._propose(batch, ks)
        chunks = [SequenceChunk(r.seq_id, r.pending + p.token_ids, num_logits=p.k + 1)
                  for r, p in zip(batch, proposals)]
        t = time.perf_counter()
        logits = self.target.forward(chunks)
        outcomes = self.sampler([VerifyInput(row, p, r.params, r.stats.rounds, len(r.context))
                                 for r, p, row in zip(batch, proposals, logits)])
        dt = time.perf_counter() - t
        if all(len(r.pending) == 1 for r in batch):          # a prefill round says nothing of verify cost
            self.costs.observe_verify(max(p.k for p in proposals) + 1, dt)
        for r, p, out in zip(batch, proposals, outcomes):
            r.stats.verify_time_s += dt
            r.stats.record(p.k, out.num_accepted)
            if r.controller is not None and p.k:
                r.controller.observe(p.k, out.num_accepted)
            committed = len(r.context)
            self.target.truncate(r.seq_id, committed + out.num_accepted)   # drop rejected drafts' K/V
            r.pending = []
            for token in out.emitted:
                r.output_ids.append(token)
                if self._should_stop(r, token):
                    break
            if not r.finished:
                r.pending = [r.output_ids[-1]]
            else:
                self.release(r)

    # ---- helpers -------------------------------------------------------------------------------------------
    def _choose_k(self, r: Request) -> int:
        room = self.max_model_len - len(r.context)          # the KV must hold committed + K tokens
        if self.proposer is None:
            return 0
        k = r.controller.choose(limit=room) if r.controller is not None else r.fixed_k
        return max(0, min(k, room, r.params.max_tokens - len(r.output_ids) - 1))

    def _propose(self, batch: list[Request], ks: list[int]) -> list[DraftProposal]:
        proposals = [DraftProposal([], None if r.params.greedy else []) for r in batch]
        wanted = [ProposeRequest(r.seq_id, r.context, k, r.params, r.stats.rounds)
                  for r, k in zip(batch, ks) if k > 0]
        if not wanted:
            return proposals
        t = time.perf_counter()
        made = iter(self.proposer.propose(wanted))
        dt = time.perf_counter() - t
        if getattr(self.proposer, "has_model", True) and all(r.stats.rounds for r in batch):
            self.costs.observe_draft(max(ks), dt)                # first rounds also prefill the draft
        for i, k in enumerate(ks):
            if k > 0:
                proposals[i] = next(made)
                batch[i].stats.draft_time_s += dt
        return proposals

    def _should_stop(self, r: Request, token: int) -> bool:
        if token in self.eos and not r.params.ignore_eos:
            r.finish_reason = "stop"
        elif len(r.output_ids) >= r.params.max_tokens or len(r.context) >= self.max_model_len:
            r.finish_reason = "length"
        elif self.stop_check is not None and r.params.stop and self.stop_check(r):
            r.finish_reason = "stop"
        return r.finished
