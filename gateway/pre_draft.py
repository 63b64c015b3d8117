"""Pre-drafting: round r + 1's proposal asked for while round r is verified (torch-free).

The gateway sends Verify(r) and, at the same moment, a Propose for round r + 1 from the context the round would have
if every draft of round r is accepted and the verifier's bonus token is the draft's own guess (`guess_next`: the
draft appends that guess itself, so the guess costs no extra round trip). The two calls travel and compute side by
side: on the draft's node the pre-draft runs while the verifier's node verifies. When round r's reply arrives:

- a draft was corrected (not all accepted): a miss, known at once; the call is cancelled (a draft still queued
  skips it) and round r + 1 drafts afresh;
- all accepted: the pre-draft is awaited; a hit when the bonus token equals its guess, and round r + 1's proposal is
  ready without another draft call; a wrong guess is a miss.

Why here and not in the draft service: the proposal travels back with its q′ to the gateway, which alone knows the
verified outcome, so the draft keeps no state that correctness or any later call depends on (any replica serves any
call, the soft KV cache only saves recomputation). A pre-draft is keyed by content: it is used only when the
committed context equals the one it was drafted from, token for token, at the round index its random streams used;
anything else (a correction, a wrong guess, a re-prefill, a request that stopped) discards it. One per request.
"""
from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass

from common.rpc.generated.specd.v1 import draft_pb2
from common.telemetry import metrics


@dataclass(slots=True)
class PreDraft:
    """A pending proposal for round `round_index`, drafted from `base` (round r's context + its drafts) + a guess."""
    base: list[int]
    round_index: int
    task: asyncio.Task           # -> (ProposeReply | None, seconds | None, compute seconds | None)

    def cancel(self, outcome: str | None = "miss") -> None:
        """Discard it (`outcome`: counted as such; None: not counted)."""
        self.task.cancel()
        if outcome:
            metrics.PRE_DRAFTS.labels(outcome).inc()

    async def take(self, context: list[int], round_index: int) -> tuple[draft_pb2.ProposeReply | None, int | None]:
        """After round r's verify accepted every draft: the pre-drafted reply when `context` (now committed) is the
        one it was drafted from, else None; and the guessed token (None when the call failed or gave no guess)."""
        try:
            reply = (await self.task)[0]
        except (asyncio.CancelledError, Exception):  # noqa: BLE001 - a failed pre-draft costs only speed
            reply = None
        if reply is None or not reply.HasField("guessed_token_id"):
            metrics.PRE_DRAFTS.labels("failed").inc()
            return None, None
        guess = reply.guessed_token_id
        hit = (round_index == self.round_index and len(context) == len(self.base) + 1 and context[-1] == guess
               and context[:-1] == self.base)
        metrics.PRE_DRAFTS.labels("hit" if hit else "miss").inc()
        return (reply if hit else None), guess


async def discard(pre: PreDraft | None) -> None:
    """Cancel a pending pre-draft and wait for the cancellation (nothing left running past a request)."""
    if pre is not None:
        pre.task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await pre.task
