"""The draft→verify round loop of one request, over gRPC.

Same decisions as the in-process decoder (common/speculative/request.py): K from the adaptive controller, stop
conditions, stats. What is specific to services: a draft that fails or misses its deadline turns the round
into plain decoding (K = 0) and is retried after a pause; a verifier that lost the session (NOT_FOUND, or a
round mismatch) is re-prefilled from the gateway's own token history under the same round counter.
"""
from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc
from opentelemetry import trace

from common.rpc.convert import sampling_to_pb
from common.rpc.generated.specd.v1 import draft_pb2, verifier_pb2
from common.speculative.adaptive_k import CostModel
from common.speculative.outcome import VerifyOutcome
from common.speculative.request import Request, StopCheck, StopConditions, observe_pass_costs
from common.telemetry import metrics

log = logging.getLogger(__name__)
tracer = trace.get_tracer(__name__)

_RESYNC_CODES = (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.FAILED_PRECONDITION)


@dataclass(slots=True)
class RoundSettings:
    draft_timeout_s: float = 5.0        # a draft slower than this makes the round plain decoding
    verify_timeout_s: float = 120.0
    draft_retry_s: float = 2.0          # after a draft failure, use K = 0 this long before trying again

    def __post_init__(self):
        for name in ("draft_timeout_s", "verify_timeout_s", "draft_retry_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}={getattr(self, name)}: must be > 0")


class DraftAvailability:
    """Circuit breaker for the draft service: down for `retry_s` after a failure, then probed again."""

    def __init__(self, retry_s: float):
        self.retry_s = retry_s
        self.down_until = 0.0
        self.failures = 0

    def available(self) -> bool:
        return time.monotonic() >= self.down_until

    def failed(self, err: grpc.aio.AioRpcError) -> None:
        self.failures += 1
        self.down_until = time.monotonic() + self.retry_s
        log.warning("draft service failed (%s: %s): plain decoding for %.1fs", err.code().name, err.details(),
                    self.retry_s)


class RoundRunner:
    def __init__(self, verifier, draft, eos: frozenset[int], max_model_len: int, settings: RoundSettings,
                 costs: CostModel, stop_check: StopCheck | None = None):
        self.verifier = verifier                 # VerifierServiceStub (grpc.aio)
        self.draft = draft                       # DraftServiceStub (grpc.aio) or None
        self.max_model_len = max_model_len
        self.stop = StopConditions(eos, max_model_len, stop_check)
        self.settings = settings
        self.costs = costs
        self.draft_state = DraftAvailability(settings.draft_retry_s)

    async def run(self, r: Request, request_id: str | None = None) -> AsyncIterator[list[int]]:
        """Run rounds until `r` finishes; yield the tokens each round appended."""
        request_id = request_id or uuid.uuid4().hex
        session = f"{request_id}-0"
        sampling = sampling_to_pb(r.params)
        try:
            while not r.finished:
                # The span ends before the yield: a suspended generator must not leave its context attached.
                with tracer.start_as_current_span("round") as span:
                    t, index = time.perf_counter(), r.stats.rounds
                    draft_down = self.draft is not None and not self.draft_state.available()
                    k = r.choose_k(self.max_model_len, self.draft is not None and not draft_down)
                    draft, draft_s = await self._propose(r, request_id, k, sampling) if k else (None, None)
                    fallback = draft_down or (k > 0 and draft is None)
                    r.stats.fallback_rounds += fallback
                    reply, session, verify_s = await self._verify(r, request_id, session, draft, sampling)
                    outcome = VerifyOutcome(list(reply.accepted_token_ids), reply.next_token_id,
                                            len(draft.token_ids) if draft is not None else 0)
                    observe_pass_costs(self.costs, [r], draft_steps=k, draft_s=draft_s,
                                       verify_tokens=outcome.num_drafted + 1, verify_s=verify_s)
                    appended = r.apply(outcome, self.stop)
                    metrics.record_round(k, outcome.num_drafted, outcome.num_accepted, len(appended),
                                         time.perf_counter() - t, fallback)
                    if span.is_recording():
                        span.set_attributes({"specd.round": index, "specd.k": outcome.num_drafted,
                                             "specd.k_chosen": k, "specd.accepted": outcome.num_accepted,
                                             "specd.fallback": fallback, "specd.session": session})
                yield appended
        finally:
            await self._release(session)

    async def _propose(self, r: Request, request_id: str, k: int,
                       sampling) -> tuple[draft_pb2.ProposeReply | None, float | None]:
        """The draft's reply, kept as it came (its q′ is forwarded to the verifier unread), and the call's
        seconds; (None, None) when the draft failed or missed its deadline: the round becomes plain decoding."""
        req = draft_pb2.ProposeRequest(request_id=request_id, context_token_ids=r.context, k=k, sampling=sampling,
                                       round=r.stats.rounds)
        t = time.perf_counter()
        try:
            reply = await self.draft.Propose(req, timeout=self.settings.draft_timeout_s)
        except grpc.aio.AioRpcError as e:
            if e.code() is grpc.StatusCode.INVALID_ARGUMENT:
                raise                                           # our own bug or bad input: do not hide it
            self.draft_state.failed(e)
            return None, None
        dt = time.perf_counter() - t
        metrics.DRAFT_LATENCY.observe(dt)
        r.stats.add_rpc(draft=True, wall_s=dt, compute_ms=reply.compute_ms, queue_ms=reply.queue_ms,
                        wire_bytes=req.ByteSize() + reply.ByteSize())
        return reply, dt

    async def _verify(self, r: Request, request_id: str, session: str, draft: draft_pb2.ProposeReply | None,
                      sampling) -> tuple[verifier_pb2.VerifyReply, str, float]:
        for attempt in range(2):
            req = verifier_pb2.VerifyRequest(
                session_id=session, round=r.stats.rounds, committed_len=len(r.context), new_tokens=r.pending,
                sampling=sampling)
            if draft is not None:
                req.draft_token_ids.extend(draft.token_ids)
                req.draft_dists.extend(draft.dists)             # q′ as the draft sent it: never decoded here
            t = time.perf_counter()
            try:
                reply = await self.verifier.Verify(req, timeout=self.settings.verify_timeout_s)
            except grpc.aio.AioRpcError as e:
                if e.code() in _RESYNC_CODES and attempt == 0:
                    log.warning("verifier lost session %s (%s): re-prefilling %d tokens", session, e.details(),
                                len(r.context))
                    session = f"{request_id}-{r.stats.rounds}-resync"    # as long after many resyncs as after one
                    r.pending = list(r.context)
                    continue
                raise
            dt = time.perf_counter() - t
            metrics.VERIFY_LATENCY.observe(dt)
            s = r.stats
            s.add_rpc(draft=False, wall_s=dt, compute_ms=reply.compute_ms, queue_ms=reply.queue_ms,
                      wire_bytes=req.ByteSize() + reply.ByteSize())
            s.prefix_cached_tokens += reply.cached_tokens
            s.max_verify_batch_size = max(s.max_verify_batch_size, reply.batch_size)
            return reply, session, dt
        raise AssertionError("unreachable")

    async def _release(self, session: str) -> None:
        try:
            await self.verifier.Release(verifier_pb2.ReleaseRequest(session_id=session), timeout=5)
        except (grpc.aio.AioRpcError, asyncio.CancelledError):
            pass                                                # the verifier's TTL frees it anyway
