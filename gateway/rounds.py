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

from common.rpc.convert import dists_to_pb, proposal_from_pb, sampling_to_pb
from common.rpc.generated.specd.v1 import draft_pb2, verifier_pb2
from common.speculative.adaptive_k import CostModel
from common.speculative.proposal import DraftProposal
from common.speculative.request import Request, StopCheck, choose_k, commit_tokens
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


@dataclass(slots=True)
class RoundTiming:
    draft_s: float = 0.0
    verify_s: float = 0.0
    fallback_rounds: int = 0
    max_batch_size: int = 0
    draft_compute_s: float = 0.0
    verify_compute_s: float = 0.0
    wire_bytes: int = 0
    queue_s: float = 0.0
    prefix_cached_tokens: int = 0


class RoundRunner:
    def __init__(self, verifier, draft, eos: frozenset[int], max_model_len: int, settings: RoundSettings,
                 costs: CostModel, stop_check: StopCheck | None = None):
        self.verifier = verifier                 # VerifierServiceStub (grpc.aio)
        self.draft = draft                       # DraftServiceStub (grpc.aio) or None
        self.eos = eos
        self.max_model_len = max_model_len
        self.settings = settings
        self.costs = costs
        self.stop_check = stop_check
        self.draft_state = DraftAvailability(settings.draft_retry_s)

    async def run(self, r: Request, request_id: str | None = None) -> AsyncIterator[list[int]]:
        """Run rounds until `r` finishes; yield the tokens each round appended."""
        request_id = request_id or uuid.uuid4().hex
        session = f"{request_id}-0"
        timing = r.timing = RoundTiming()
        sampling = sampling_to_pb(r.params)
        try:
            while not r.finished:
                # The span ends before the yield: a suspended generator must not leave its context attached.
                with tracer.start_as_current_span("round") as span:
                    t, index, failures = time.perf_counter(), r.stats.rounds, timing.fallback_rounds
                    draft_down = self.draft is not None and not self.draft_state.available()
                    k = choose_k(r, self.max_model_len, self.draft is not None and not draft_down)
                    proposal = await self._propose(r, request_id, k, sampling, timing) if k else DraftProposal([])
                    reply, session = await self._verify(r, request_id, session, proposal, sampling, timing)
                    emitted = list(reply.accepted_token_ids) + [reply.next_token_id]
                    accepted = len(reply.accepted_token_ids)
                    r.stats.record(proposal.k, accepted)
                    if r.controller is not None and proposal.k:
                        r.controller.observe(proposal.k, accepted)
                    appended = commit_tokens(r, emitted, self.eos, self.max_model_len, self.stop_check)
                    fallback = draft_down or timing.fallback_rounds > failures
                    metrics.record_round(k, proposal.k, accepted, len(appended), time.perf_counter() - t, fallback)
                    if span.is_recording():
                        span.set_attributes({"specd.round": index, "specd.k": proposal.k, "specd.k_chosen": k,
                                             "specd.accepted": accepted, "specd.fallback": fallback,
                                             "specd.session": session})
                yield appended
        finally:
            await self._release(session)

    async def _propose(self, r: Request, request_id: str, k: int, sampling, timing: RoundTiming) -> DraftProposal:
        req = draft_pb2.ProposeRequest(request_id=request_id, context_token_ids=r.context, k=k, sampling=sampling,
                                       round=r.stats.rounds)
        t = time.perf_counter()
        try:
            reply = await self.draft.Propose(req, timeout=self.settings.draft_timeout_s)
        except grpc.aio.AioRpcError as e:
            if e.code() is grpc.StatusCode.INVALID_ARGUMENT:
                raise                                           # our own bug or bad input: do not hide it
            self.draft_state.failed(e)
            timing.fallback_rounds += 1
            return DraftProposal([])
        dt = time.perf_counter() - t
        metrics.DRAFT_LATENCY.observe(dt)
        timing.draft_s += dt
        timing.draft_compute_s += reply.compute_ms / 1000
        timing.queue_s += reply.queue_ms / 1000
        timing.wire_bytes += req.ByteSize() + reply.ByteSize()
        r.stats.draft_time_s += dt
        if r.stats.rounds:                                      # the first round also prefills the draft
            self.costs.observe_draft(k, dt)
        return proposal_from_pb(reply.token_ids, reply.dists)

    async def _verify(self, r: Request, request_id: str, session: str, proposal: DraftProposal, sampling,
                      timing: RoundTiming):
        for attempt in range(2):
            req = verifier_pb2.VerifyRequest(
                session_id=session, round=r.stats.rounds, committed_len=len(r.context), new_tokens=r.pending,
                draft_token_ids=proposal.token_ids, sampling=sampling, draft_dists=dists_to_pb(proposal))
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
            timing.verify_s += dt
            timing.verify_compute_s += reply.compute_ms / 1000
            timing.queue_s += reply.queue_ms / 1000
            timing.prefix_cached_tokens += reply.cached_tokens
            timing.wire_bytes += req.ByteSize() + reply.ByteSize()
            timing.max_batch_size = max(timing.max_batch_size, reply.batch_size)
            r.stats.verify_time_s += dt
            if len(r.pending) == 1:
                self.costs.observe_verify(proposal.k + 1, dt)
            return reply, session
        raise AssertionError("unreachable")

    async def _release(self, session: str) -> None:
        try:
            await self.verifier.Release(verifier_pb2.ReleaseRequest(session_id=session), timeout=5)
        except (grpc.aio.AioRpcError, asyncio.CancelledError):
            pass                                                # the verifier's TTL frees it anyway
