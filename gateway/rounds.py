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

from common.errors import KVCacheExhaustedError, RoundMismatchError
from common.rpc.convert import logprobs_from_pb, sampling_to_pb
from common.rpc.errors import reason_of
from common.rpc.generated.specd.v1 import draft_pb2, verifier_pb2
from common.speculative.adaptive_k import CostModel
from common.speculative.outcome import VerifyOutcome
from common.speculative.request import Request, StopCheck, StopConditions, observe_pass_costs
from common.telemetry import metrics
from gateway.draft_link import DraftLink

log = logging.getLogger(__name__)
tracer = trace.get_tracer(__name__)

@dataclass(slots=True)
class RoundSettings:
    draft_timeout_s: float = 5.0        # a draft slower than this makes the round plain decoding
    verify_timeout_s: float = 120.0
    draft_retry_s: float = 2.0          # after a draft failure, use K = 0 this long before trying again

    def __post_init__(self):
        for name in ("draft_timeout_s", "verify_timeout_s", "draft_retry_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}={getattr(self, name)}: must be > 0")


def session_lost(err: grpc.aio.AioRpcError) -> bool:
    """The verifier no longer holds the session as the gateway knows it: gone (NOT_FOUND), or out of step (a round
    conflict). Only these re-prefill; any other FAILED_PRECONDITION is an error to report, not to paper over."""
    code = err.code()
    return code is grpc.StatusCode.NOT_FOUND or (
        code is grpc.StatusCode.FAILED_PRECONDITION and reason_of(err) == RoundMismatchError.reason)


class RoundRunner:
    def __init__(self, verifier, draft, eos: frozenset[int], max_model_len: int, settings: RoundSettings,
                 costs: CostModel, stop_check: StopCheck | None = None, *, fingerprint: str = "",
                 verifier_k_max: int | None = None):
        """`verifier`/`draft`: grpc.aio stubs (draft None: no speculation); `max_model_len`, `fingerprint` and
        `verifier_k_max`: from the verifier's Info (the draft's own Info is checked by its DraftLink)."""
        self.verifier = verifier                 # VerifierServiceStub (grpc.aio)
        self.draft = draft                       # DraftServiceStub (grpc.aio) or None
        self.max_model_len = max_model_len
        self.verifier_k_max = verifier_k_max
        self.stop = StopConditions(eos, max_model_len, stop_check)
        self.settings = settings
        self.costs = costs
        self.draft_link = DraftLink(draft, fingerprint, settings.draft_retry_s) if draft is not None else None

    async def run(self, r: Request, request_id: str | None = None,
                  cache_namespace: str = "") -> AsyncIterator[list[int]]:
        """Run rounds until `r` finishes; yield the tokens each round appended. `cache_namespace`: the caller's
        prefix-cache tenant, sent to the draft and the verifier ("" = the shared namespace)."""
        request_id = request_id or uuid.uuid4().hex
        session = f"{request_id}-0"
        sampling = sampling_to_pb(r.params)
        try:
            while not r.finished:
                # The span ends before the yield: a suspended generator must not leave its context attached.
                with tracer.start_as_current_span("round") as span:
                    t, index = time.perf_counter(), r.stats.rounds
                    can_draft = self.draft_link is not None and await self.draft_link.ready()
                    draft_down = self.draft_link is not None and not can_draft
                    k = r.choose_k(self.max_model_len, can_draft, k_limit=self._k_limit(r) if can_draft else None)
                    draft, draft_s = (await self._propose(r, request_id, k, sampling, cache_namespace) if k
                                      else (None, None))
                    fallback = draft_down or (k > 0 and draft is None)
                    r.stats.fallback_rounds += fallback
                    reply, session, verify_s = await self._verify(r, request_id, session, draft, sampling,
                                                                  cache_namespace)
                    outcome = VerifyOutcome(list(reply.accepted_token_ids), reply.next_token_id,
                                            len(draft.token_ids) if draft is not None else 0,
                                            logprobs_from_pb(reply.logprobs) if r.params.logprobs is not None
                                            else None)
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

    def _k_limit(self, r: Request) -> int:
        """What the services accept: the draft's K and context limits, and the verifier's K limit."""
        limit = self.draft_link.k_limit(r.num_tokens)
        return limit if self.verifier_k_max is None else min(limit, self.verifier_k_max)

    async def _propose(self, r: Request, request_id: str, k: int, sampling,
                       cache_namespace: str = "") -> tuple[draft_pb2.ProposeReply | None, float | None]:
        """The draft's reply, kept as it came (its q′ is forwarded to the verifier unread), and the call's
        seconds; (None, None) when the draft failed or missed its deadline: the round becomes plain decoding."""
        req = draft_pb2.ProposeRequest(request_id=request_id, context_token_ids=r.context, k=k, sampling=sampling,
                                       round=r.stats.rounds, cache_namespace=cache_namespace,
                                       prompt_len=len(r.prompt_ids))
        t = time.perf_counter()
        try:
            reply = await self.draft.Propose(req, timeout=self.settings.draft_timeout_s)
        except grpc.aio.AioRpcError as e:
            if e.code() is grpc.StatusCode.INVALID_ARGUMENT:
                raise                                           # our own bug or bad input: do not hide it
            if reason_of(e) != KVCacheExhaustedError.reason:    # this request's context alone not fitting the
                self.draft_link.failed(e)                       # draft now pauses nobody else's drafting
            return None, None
        dt = time.perf_counter() - t
        metrics.DRAFT_LATENCY.observe(dt)
        r.stats.add_rpc(draft=True, wall_s=dt, compute_ms=reply.compute_ms, queue_ms=reply.queue_ms,
                        wire_bytes=req.ByteSize() + reply.ByteSize())
        return reply, dt

    async def _verify(self, r: Request, request_id: str, session: str, draft: draft_pb2.ProposeReply | None,
                      sampling, cache_namespace: str = "") -> tuple[verifier_pb2.VerifyReply, str, float]:
        for attempt in range(2):
            req = verifier_pb2.VerifyRequest(
                session_id=session, round=r.stats.rounds, committed_len=r.num_tokens, new_tokens=r.pending,
                sampling=sampling, cache_namespace=cache_namespace, prompt_len=len(r.prompt_ids))
            if draft is not None:
                req.draft_token_ids.extend(draft.token_ids)
                req.draft_dists.extend(draft.dists)             # q′ as the draft sent it: never decoded here
            t = time.perf_counter()
            try:
                reply = await self.verifier.Verify(req, timeout=self.settings.verify_timeout_s)
            except grpc.aio.AioRpcError as e:
                if attempt == 0 and session_lost(e):
                    log.warning("verifier lost session %s (%s): re-prefilling %d tokens", session, e.details(),
                                r.num_tokens)
                    if e.code() is grpc.StatusCode.FAILED_PRECONDITION:
                        await self._release(session)             # out of step, but still open there: free it
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
