"""Verifier sessions: which KV sequence serves a gateway request, its committed tokens, which round comes next,
the last reply."""
from __future__ import annotations

import time
from dataclasses import dataclass, field

from common.errors import KVCacheExhaustedError
from common.speculative.outcome import TokenLogprob


@dataclass(slots=True)
class VerifyResult:
    accepted: list[int]
    next_token: int
    is_bonus: bool
    truncate_to: int           # the verifier's KV now holds exactly this many tokens of the session
    round: int
    batch_size: int
    compute_ms: float
    queue_ms: float = 0.0      # waited in the verify queue before the forward pass
    cached_tokens: int = 0     # of the call's new tokens, loaded from the prefix cache
    logprobs: list[TokenLogprob] | None = None     # the target's, one per emitted token (when asked for)


@dataclass(slots=True)
class Session:
    session_id: str
    seq_id: int
    next_round: int = 0
    # The tokens whose K/V are cached: every committed token but the last emitted one (the penalties' history).
    # A (re-)prefill starts it from the call's new tokens; each round appends its new tokens and accepted drafts.
    tokens: list[int] = field(default_factory=list)
    last_result: VerifyResult | None = None   # replayed for a retried round (idempotency)
    last_used: float = field(default_factory=time.monotonic)

    @property
    def kv_len(self) -> int:
        return len(self.tokens)


class SessionTable:
    def __init__(self, ttl_s: float, max_sessions: int):
        self.ttl_s = ttl_s
        self.max_sessions = max_sessions
        self._sessions: dict[str, Session] = {}
        self._next_seq = 1

    def __len__(self) -> int:
        return len(self._sessions)

    def all(self) -> list[Session]:
        return list(self._sessions.values())

    def get(self, session_id: str) -> Session | None:
        return self._sessions.get(session_id)

    def create(self, session_id: str) -> Session:
        if len(self._sessions) >= self.max_sessions:
            raise KVCacheExhaustedError(f"too many sessions: {len(self._sessions)} open, max_sessions="
                                        f"{self.max_sessions}")
        s = Session(session_id, self._next_seq)
        self._next_seq += 1
        self._sessions[session_id] = s
        return s

    def pop(self, session_id: str) -> Session | None:
        return self._sessions.pop(session_id, None)

    def expired(self, now: float | None = None) -> list[Session]:
        now = time.monotonic() if now is None else now
        return [s for s in self._sessions.values() if now - s.last_used > self.ttl_s]
