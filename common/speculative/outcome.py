"""What one verified round decided for one sequence, in the rejection sampler's vocabulary (torch-free).

The in-process sampler returns it; the gateway rebuilds it from a VerifyReply; `Request.apply` books it.
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(slots=True)
class TokenLogprob:
    """The target's log-probability of one emitted token and the most likely alternatives at its position."""
    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)     # (token id, logprob), most likely first


@dataclass(slots=True)
class VerifyOutcome:
    accepted: list[int]            # d_1..d_n
    next_token: int                # recovered (n < K) or bonus (n == K)
    num_drafted: int               # K
    logprobs: list[TokenLogprob] | None = None     # one per emitted token when the request asked for logprobs

    @property
    def num_accepted(self) -> int:
        return len(self.accepted)

    @property
    def is_bonus(self) -> bool:
        return self.num_accepted == self.num_drafted

    @property
    def emitted(self) -> list[int]:
        return self.accepted + [self.next_token]
