"""One request's state in the round loop, and the one round bookkeeping every driver of rounds uses (torch-free).

The in-process decoder (decoder.py) and the gateway (gateway/rounds.py) both pick K with `Request.choose_k`,
feed the shared cost model with `observe_pass_costs` and book each verified round with `Request.apply`, so
the two paths choose K, learn and stop in exactly the same way.
"""
from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from common.errors import ConfigError
from common.speculative.adaptive_k import AdaptiveK, CostModel
from common.speculative.outcome import TokenLogprob, VerifyOutcome
from common.speculative.params import SamplingParams
from common.speculative.stats import RequestStats

_seq_ids = itertools.count(1)


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
    stats: RequestStats = field(default_factory=RequestStats)
    output_logprobs: list[TokenLogprob] = field(default_factory=list)    # aligned with output_ids (logprobs asked)
    draft_seen: int = 0                        # context tokens the draft's KV holds, as the rounds left it

    def __post_init__(self):
        self.pending = list(self.prompt_ids)

    @property
    def context(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def num_tokens(self) -> int:
        """len(context), without building it (checked after every emitted token)."""
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def draft_lag(self) -> int:
        """Tokens a drafting round would feed the draft before its first step beyond the usual one: the prompt
        before the first drafting round, and whatever K = 0 rounds emitted since the last."""
        return max(0, self.num_tokens - self.draft_seen - 1)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def choose_k(self, max_model_len: int, can_draft: bool, k_limit: int | None = None) -> int:
        """K for the next round: the controller's (or the fixed) choice, within the context and token budgets and
        `k_limit` (what the draft and verifier services accept)."""
        if not can_draft:
            return 0
        room = max_model_len - self.num_tokens           # the verifier's KV must hold committed + K tokens
        if k_limit is not None:
            room = min(room, k_limit)
        if self.controller is not None:
            k = self.controller.choose(limit=room, lag=self.draft_lag,
                                       remaining=self.params.max_tokens - len(self.output_ids))
        else:
            k = self.fixed_k
        return max(0, min(k, room, self.params.max_tokens - len(self.output_ids) - 1))

    def apply(self, outcome: VerifyOutcome, stop: StopConditions) -> list[int]:
        """Book one verified round: its statistics, what the K controller learns, and the emitted tokens up to
        the first stop condition. Returns the tokens actually appended."""
        self.stats.record(outcome.num_drafted, outcome.num_accepted)
        if outcome.num_drafted:       # the draft fed the context and its first K - 1 drafts; the accepted ones stay
            self.draft_seen = self.num_tokens + min(outcome.num_accepted, outcome.num_drafted - 1)
        if self.controller is not None and outcome.num_drafted:
            self.controller.observe(outcome.num_drafted, outcome.num_accepted)
        return self._commit(outcome.emitted, stop, outcome.logprobs)

    def _commit(self, emitted: list[int], stop: StopConditions,
                logprobs: list[TokenLogprob] | None = None) -> list[int]:
        if self.params.logprobs is not None and (logprobs is None or len(logprobs) != len(emitted)):
            raise ValueError(f"logprobs asked for but the round gave {0 if logprobs is None else len(logprobs)} for "
                             f"{len(emitted)} emitted tokens")
        appended = []
        for i, token in enumerate(emitted):
            self.output_ids.append(token)
            appended.append(token)
            if self.params.logprobs is not None:
                self.output_logprobs.append(logprobs[i])
            self.finish_reason = stop.reason(self, token)
            if self.finished:
                break
        self.pending = [] if self.finished else [self.output_ids[-1]]
        return appended


# stop_check(request) -> True when the request's text now ends a generation (stop strings)
StopCheck = Callable[[Request], bool]


@dataclass(slots=True, frozen=True)
class StopConditions:
    """When a request ends: an EOS token (unless ignored), its token budget, the context limit, a stop string."""
    eos: frozenset[int]
    max_model_len: int
    stop_check: StopCheck | None = None

    def reason(self, r: Request, token: int) -> str | None:
        """Why `r` ends with `token` just appended, or None."""
        if token in self.eos and not r.params.ignore_eos:
            return "stop"
        if len(r.output_ids) >= r.params.max_tokens or r.num_tokens >= self.max_model_len:
            return "length"
        if self.stop_check is not None and r.params.stop and self.stop_check(r):
            return "stop"
        return None


def observe_pass_costs(costs: CostModel, batch: Sequence[Request], *, draft_steps: int, draft_s: float | None,
                       verify_tokens: int, verify_s: float, draft_compute_s: float | None = None,
                       verify_compute_s: float | None = None) -> None:
    """Feed one pass's timings to the shared cost model. Call before `apply`.

    A round that also prefilled says nothing of steady-state cost. A drafting round whose draft first caught up
    (a request's first, or the first after plain-decoding (K = 0) rounds: the draft feeds every token it missed)
    prices the catch-up per token instead of a draft step (timed as "K steps" it would price a step at 2-3x its cost
    and keep K at 0). A round whose pending tokens are more than the last emitted one (the prompt, a re-prefill)
    prefills the target and prices nothing on the verify side.
    `draft_s=None`: no draft call whose time means anything (none made, a model-free proposer, or a pre-drafted
    proposal, whose call overlapped the previous verify). `*_compute_s`: what a remote service reports
    computing (the rest of the call's time is its fixed cost); None in process.
    """
    if draft_s is not None and draft_steps > 0:
        lag = sum(r.draft_lag for r in batch)
        if lag > len(batch):
            costs.observe_catchup(lag, draft_steps, draft_s if draft_compute_s is None else draft_compute_s)
        else:
            costs.observe_draft(draft_steps, draft_s, draft_compute_s)
    if all(len(r.pending) == 1 for r in batch):
        costs.observe_verify(verify_tokens, verify_s, verify_compute_s)


def parse_num_speculative_tokens(value, k_max: int) -> int | str:
    """A K setting as users write it: an integer in [0, k_max] or 'auto'."""
    if value == "auto":
        return "auto"
    try:
        k = int(value)
    except (TypeError, ValueError):
        raise ConfigError(f"num_speculative_tokens={value!r}: must be an integer in [0, {k_max}] or 'auto'") from None
    if not 0 <= k <= k_max:
        raise ConfigError(f"num_speculative_tokens={k}: must be in [0, {k_max}] (k_max={k_max}) or 'auto'")
    return k
