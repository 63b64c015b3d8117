"""The gateway's view of the draft service: whether to ask it now (a circuit breaker), and what it accepts.

The draft's `Info` is checked on every (re)connection, before the first Propose and again after every failure: a
draft that was down when the gateway started, or that came back as another model, is never used unchecked. A
draft whose tokenizer differs from the verifier's is not used (its rounds run at K = 0, retried after the pause);
its `k_max` and `max_model_len` cap K, so a draft with a shorter context makes rounds plain instead of failing them.
"""
from __future__ import annotations

import logging
import time

import grpc

from common.rpc.generated.specd.v1 import common_pb2

log = logging.getLogger(__name__)


class DraftLink:
    def __init__(self, stub, fingerprint: str, retry_s: float, info_timeout_s: float = 2.0):
        self.stub = stub                          # DraftServiceStub (grpc.aio)
        self.fingerprint = fingerprint            # the verifier's vocab fingerprint
        self.retry_s = retry_s
        self.info_timeout_s = info_timeout_s
        self.down_until = 0.0
        self.failures = 0
        self.k_max: int | None = None             # from the draft's Info, once checked
        self.max_model_len: int | None = None
        self._checked = False
        self.pre_draft_ok = True                  # False once a reply showed the draft predates pre-drafting (v1.2)

    def available(self) -> bool:
        """Not in the pause that follows a failure."""
        return time.monotonic() >= self.down_until

    async def ready(self) -> bool:
        """True when the draft may be asked now: out of its pause, and its Info checked since it last failed."""
        if not self.available():
            return False
        if self._checked:
            return True
        try:
            info = await self.stub.Info(common_pb2.InfoRequest(), timeout=self.info_timeout_s)
        except grpc.aio.AioRpcError as e:
            self.failed(e)
            return False
        if info.vocab_fingerprint != self.fingerprint:
            self._pause(f"its tokenizer fingerprint {info.vocab_fingerprint} differs from the verifier's "
                        f"{self.fingerprint}", logging.ERROR)
            return False
        self.k_max, self.max_model_len = info.k_max, info.max_model_len
        self._checked = True
        self.pre_draft_ok = True                  # whatever answers now may be a newer replica
        return True

    def k_limit(self, context_len: int) -> int:
        """The largest K the draft accepts for a context of `context_len` tokens (after `ready()`)."""
        return max(0, min(self.k_max, self.max_model_len - context_len))

    def no_pre_draft(self) -> None:
        """A pre-draft reply came without its guessed token: that draft predates v1.2; stop asking it to pre-draft."""
        if self.pre_draft_ok:
            log.warning("draft service ignores guess_next (it predates specd.v1.2): pre-drafting off until it is "
                        "reconnected")
        self.pre_draft_ok = False

    def failed(self, err: grpc.aio.AioRpcError) -> None:
        self._pause(f"{err.code().name}: {err.details()}", logging.WARNING)

    def _pause(self, why: str, level: int) -> None:
        self.failures += 1
        self._checked = False                     # whatever answers next is checked again
        self.down_until = time.monotonic() + self.retry_s
        log.log(level, "draft service not used (%s): plain decoding for %.1fs", why, self.retry_s)
