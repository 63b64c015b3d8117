"""One request's state in the round loop, and the decisions every driver of rounds shares.

The in-process decoder (decoder.py) and the gateway (gateway/rounds.py) both call `choose_k` and
`commit_tokens`, so the two paths pick K and stop in exactly the same way.
"""
from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass, field

from common.speculative.adaptive_k import AdaptiveK
from common.speculative.sampling import SamplingParams

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
    timing: object = None                       # the gateway's per-request timing (gateway/rounds.py)

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


def choose_k(r: Request, max_model_len: int, can_draft: bool) -> int:
    """K for the next round: the controller's (or the fixed) choice, within the context and token budgets."""
    if not can_draft:
        return 0
    room = max_model_len - len(r.context)                  # the verifier's KV must hold committed + K tokens
    k = r.controller.choose(limit=room) if r.controller is not None else r.fixed_k
    return max(0, min(k, room, r.params.max_tokens - len(r.output_ids) - 1))


def commit_tokens(r: Request, emitted: list[int], eos: frozenset[int], max_model_len: int,
                  stop_check: StopCheck | None = None) -> list[int]:
    """Append a round's emitted tokens until a stop condition; return the tokens actually appended."""
    appended = []
    for token in emitted:
        r.output_ids.append(token)
        appended.append(token)
        if token in eos and not r.params.ignore_eos:
            r.finish_reason = "stop"
        elif len(r.output_ids) >= r.params.max_tokens or len(r.context) >= max_model_len:
            r.finish_reason = "length"
        elif stop_check is not None and r.params.stop and stop_check(r):
            r.finish_reason = "stop"
        if r.finished:
            break
    r.pending = [] if r.finished else [r.output_ids[-1]]
    return appended
