"""The draft→verify round loop of one request, over gRPC.

Same decisions as the in-process decoder (common/speculative/request.py): K from the adaptive controller, stop
conditions, stats. What is specific to services: a draft that fails or misses its deadline turns the round
into plain decoding (K = 0) and is retried after a pause; a verifier that lost the session (NOT_FOUND, or a
round mismatch) is re-prefilled from the gateway's own token history under the same round counter; so is a session
whose verifier replica failed, on another replica (gateway/verifier_pool.py). With `pre_draft`, the next round's
proposal is asked for while this round is verified (gateway/pre_draft.py).
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
from gateway.pre_draft import PreDraft, discard
from gateway.verifier_pool import NoReplicaError, Replica, VerifierPool, replica_lost

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


@dataclass(slots=True)
class SessionRoute:
    """Where one request's verifier session lives: the replica it is pinned to and its session id there."""
    replica: Replica
    session: str
    moves: int = 0


def session_lost(err: grpc.aio.AioRpcError) -> bool:
    """The verifier no longer holds the session as the gateway knows it: gone (NOT_FOUND), or out of step (a round
    conflict). Only these re-prefill; any other FAILED_PRECONDITION is an error to report, not to paper over."""
    code = err.code()
    return code is grpc.StatusCode.NOT_FOUND or (
        code is grpc.StatusCode.FAILED_PRECONDITION and reason_of(err) == RoundMismatchError.reason)


class RoundRunner:
    def __init__(self, verifier, draft, eos: frozenset[int], max_model_len: int, settings: RoundSettings,
                 costs: CostModel, stop_check: StopCheck | None = None, *, fingerprint: str = "",
                 verifier_k_max: int | None = None, pre_draft: bool = False):
        """`verifier`: a VerifierPool, or one grpc.aio stub; `draft`: a grpc.aio stub (None: no speculation);
        `max_model_len`, `fingerprint` and `verifier_k_max`: from the verifier's Info (the draft's own Info is
        checked by its DraftLink).
        `pre_draft`: draft round r + 1 while round r is verified."""
        self.verifiers = verifier if isinstance(verifier, VerifierPool) else VerifierPool.single(verifier)
        self.draft = draft                       # DraftServiceStub (grpc.aio) or None
        self.max_model_len = max_model_len
        self.verifier_k_max = verifier_k_max
        self.stop = StopConditions(eos, max_model_len, stop_check)
        self.settings = settings
        self.costs = costs
        self.draft_link = DraftLink(draft, fingerprint, settings.draft_retry_s) if draft is not None else None
        self.pre_draft = pre_draft and draft is not None
        costs.pre_draft = self.pre_draft
        metrics.watch_costs(costs)

    async def run(self, r: Request, request_id: str | None = None,
                  cache_namespace: str = "") -> AsyncIterator[list[int]]:
        """Run rounds until `r` finishes; yield the tokens each round appended. `cache_namespace`: the caller's
        prefix-cache tenant, sent to the draft and the verifier ("" = the shared namespace)."""
        request_id = request_id or uuid.uuid4().hex
        route = self._route(request_id)
        sampling = sampling_to_pb(r.params)
        pre: PreDraft | None = None              # round r + 1's proposal, asked for while round r is verified
        try:
            while not r.finished:
                # The span ends before the yield: a suspended generator must not leave its context attached.
                with tracer.start_as_current_span("round") as span:
                    t, index = time.perf_counter(), r.stats.rounds
                    can_draft = self.draft_link is not None and await self.draft_link.ready()
                    draft_down = self.draft_link is not None and not can_draft
                    draft, draft_s, draft_compute_s, pre_drafted = None, None, None, pre is not None
                    if pre is not None:
                        draft, guess = await pre.take(r.context, index)
                        if guess is not None and r.controller is not None:
                            r.controller.observe_guess(guess == r.context[-1])
                        pre = None
                    beside = 0                               # K drafted beside this round's prefill
                    if draft is not None and can_draft:
                        k = len(draft.token_ids)             # chosen, within the limits, when it was asked for
                    else:
                        draft = None
                        k = r.choose_k(self.max_model_len, can_draft,
                                       k_limit=self._k_limit(r) if can_draft else None)
                        if k and self._drafts_beside_prefill(r):
                            beside, k = k, 0
                        elif k:
                            draft, draft_s, draft_compute_s = await self._propose(r, request_id, k, sampling,
                                                                                  cache_namespace)
                    fallback = draft_down or (k > 0 and draft is None)
                    r.stats.fallback_rounds += fallback
                    verify = asyncio.ensure_future(self._verify(r, request_id, route, draft, sampling,
                                                                cache_namespace))
                    if draft is not None:
                        pre = self._start_pre_draft(r, request_id, draft, sampling, cache_namespace)
                    elif beside:
                        pre = self._pre_draft(r, request_id, list(r.context), beside, sampling, cache_namespace)
                        if pre is not None:
                            r.draft_seen = r.num_tokens      # its prefill: the next round's draft has no lag
                    try:
                        reply, verify_s = await verify
                    finally:
                        verify.cancel()                      # a no-op once done; a cancelled round stops it
                    outcome = VerifyOutcome(list(reply.accepted_token_ids), reply.next_token_id,
                                            len(draft.token_ids) if draft is not None else 0,
                                            logprobs_from_pb(reply.logprobs) if r.params.logprobs is not None
                                            else None)
                    if pre is not None and outcome.num_accepted < outcome.num_drafted:
                        pre.cancel("miss")                   # a draft was corrected: known without waiting
                        pre = None
                    observe_pass_costs(self.costs, [r], draft_steps=k, draft_s=draft_s,
                                       verify_tokens=outcome.num_drafted + 1, verify_s=verify_s,
                                       draft_compute_s=draft_compute_s, verify_compute_s=reply.compute_ms / 1000)
                    appended = r.apply(outcome, self.stop)
                    if r.finished and pre is not None:
                        pre.cancel(None)                     # the request ended: nothing to pre-draft for
                        pre = None
                    metrics.record_round(k, outcome.num_drafted, outcome.num_accepted, len(appended),
                                         time.perf_counter() - t, fallback)
                    if span.is_recording():
                        span.set_attributes({"specd.round": index, "specd.k": outcome.num_drafted,
                                             "specd.k_chosen": k, "specd.accepted": outcome.num_accepted,
                                             "specd.fallback": fallback, "specd.session": route.session,
                                             "specd.verifier": route.replica.address,
                                             "specd.pre_draft": ("hit" if draft is not None and draft_s is None
                                                                 else "miss" if pre_drafted else "none")})
                yield appended
        finally:
            await discard(pre)
            await self._release(route.replica, route.session)
            self.verifiers.unpin(route.replica)

    def _drafts_beside_prefill(self, r: Request) -> bool:
        """A request's first round under K=auto verifies the prompt alone and pre-drafts round 2 beside it: the
        draft's prefill of the prompt then runs while the verifier prefills it, instead of before, and the first
        token comes as soon as the verifier has it (a drafting first round made it wait for the draft's prefill
        and K steps too: ~6x the time to first token of K = 0 in bench-serve-peers)."""
        return (self.pre_draft and self.draft_link.pre_draft_ok and r.controller is not None
                and r.stats.rounds == 0 and len(r.pending) == r.num_tokens)

    def _start_pre_draft(self, r: Request, request_id: str, draft: draft_pb2.ProposeReply, sampling,
                         cache_namespace: str) -> PreDraft | None:
        """Ask for round r + 1's proposal now, for the outcome "every draft of `draft` accepted, the bonus token
        the draft's own guess"; None when pre-drafting is off, does not pay (the K controller's estimate), or the
        next round has no room for drafts."""
        if not (self.pre_draft and self.draft_link.pre_draft_ok):
            return None
        k = len(draft.token_ids)
        if r.controller is not None and not r.controller.should_pre_draft(k):
            return None
        return self._pre_draft(r, request_id, r.context + list(draft.token_ids), k, sampling, cache_namespace,
                               emitted_before=k + 1)

    def _pre_draft(self, r: Request, request_id: str, base: list[int], k: int, sampling, cache_namespace: str,
                   emitted_before: int = 1) -> PreDraft | None:
        """A pre-draft of up to `k` tokens after `base` + the draft's guess, for the next round (`emitted_before`:
        the tokens this round emits if it goes as guessed); None when the next round has no room for drafts."""
        after = len(base) + 1                                    # + the guessed token
        limit = min(self.draft_link.k_limit(after), self.max_model_len - after,
                    r.params.max_tokens - (len(r.output_ids) + emitted_before) - 1)
        if self.verifier_k_max is not None:
            limit = min(limit, self.verifier_k_max)
        k_next = min(k, limit)
        if k_next <= 0:
            return None
        task = asyncio.ensure_future(self._propose(r, request_id, k_next, sampling, cache_namespace,
                                                   context=base, round_index=r.stats.rounds + 1, guess_next=True))
        return PreDraft(base, r.stats.rounds + 1, task)

    def _route(self, request_id: str) -> SessionRoute:
        """A new session on the least-loaded healthy verifier replica; none healthy: UNAVAILABLE, as a lone
        verifier that is down answers."""
        try:
            replica = self.verifiers.pick()
        except NoReplicaError as e:
            raise grpc.aio.AioRpcError(grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(), grpc.aio.Metadata(),
                                       str(e)) from None
        metrics.VERIFIER_ROUTED.labels(replica.address).inc()
        return SessionRoute(replica, f"{request_id}-0")

    def _move(self, r: Request, request_id: str, route: SessionRoute, session: str,
              err: grpc.aio.AioRpcError) -> str:
        """The session's replica failed: pin it to another and re-prefill there from the gateway's history (the
        old replica's copy, if it still lives, expires by its TTL or is released below)."""
        old, old_session = route.replica, session
        self.verifiers.failed(old, err)
        route.replica = self.verifiers.pick(exclude=old)
        self.verifiers.unpin(old)
        route.moves += 1
        session = f"{request_id}-{r.stats.rounds}-moved{route.moves}"
        r.pending = list(r.context)
        metrics.VERIFIER_ROUTED.labels(route.replica.address).inc()
        metrics.SESSION_MOVES.labels(err.code().name).inc()
        log.warning("verifier replica %s failed (%s): session %s moves to %s, re-prefilling %d tokens", old.address,
                    err.code().name, old_session, route.replica.address, r.num_tokens)
        if err.code() is not grpc.StatusCode.UNAVAILABLE:       # maybe alive but slow: free its copy, in passing
            asyncio.ensure_future(self._release(old, old_session))
        return session

    def _k_limit(self, r: Request) -> int:
        """What the services accept: the draft's K and context limits, and the verifier's K limit."""
        limit = self.draft_link.k_limit(r.num_tokens)
        return limit if self.verifier_k_max is None else min(limit, self.verifier_k_max)

    async def _propose(self, r: Request, request_id: str, k: int, sampling, cache_namespace: str = "", *,
                       context: list[int] | None = None, round_index: int | None = None, guess_next: bool = False
                       ) -> tuple[draft_pb2.ProposeReply | None, float | None, float | None]:
        """The draft's reply, kept as it came (its q′ is forwarded to the verifier unread), the call's seconds and
        the compute the draft reports; (None, None, None) when the draft failed or missed its deadline: the round
        becomes plain decoding. `context`/`round_index`/`guess_next`: a pre-draft for the next round (its failure
        only costs speed: the round then drafts afresh, and that call's failure is the one that counts)."""
        req = draft_pb2.ProposeRequest(request_id=request_id, context_token_ids=r.context if context is None
                                       else context, k=k, sampling=sampling,
                                       round=r.stats.rounds if round_index is None else round_index,
                                       cache_namespace=cache_namespace, prompt_len=len(r.prompt_ids),
                                       guess_next=guess_next)
        t = time.perf_counter()
        try:
            reply = await self.draft.Propose(req, timeout=self.settings.draft_timeout_s)
        except grpc.aio.AioRpcError as e:
            if guess_next:
                log.log(logging.ERROR if e.code() is grpc.StatusCode.INVALID_ARGUMENT else logging.DEBUG,
                        "pre-draft failed (%s: %s); the round drafts afresh", e.code().name, e.details())
                return None, None, None
            if e.code() is grpc.StatusCode.INVALID_ARGUMENT:
                raise                                           # our own bug or bad input: do not hide it
            if reason_of(e) != KVCacheExhaustedError.reason:    # this request's context alone not fitting the
                self.draft_link.failed(e)                       # draft now pauses nobody else's drafting
            return None, None, None
        dt = time.perf_counter() - t
        if guess_next and not reply.HasField("guessed_token_id"):
            self.draft_link.no_pre_draft()                      # a draft that predates v1.2
            return None, None, None
        network = dt - (reply.compute_ms + reply.queue_ms) / 1000
        metrics.RPC_NETWORK.labels("draft").observe(max(0.0, network))
        if not guess_next:
            metrics.DRAFT_LATENCY.observe(dt)
        # The stats' draft times are the calls rounds waited for; a pre-draft ran in the verify call's shadow (its
        # bytes count, its time and compute do not: draft_compute_ms <= draft_ms holds, as the split assumes).
        waited = not guess_next
        r.stats.add_rpc(draft=True, wall_s=dt if waited else 0.0, compute_ms=reply.compute_ms if waited else 0.0,
                        queue_ms=reply.queue_ms if waited else 0.0, wire_bytes=req.ByteSize() + reply.ByteSize())
        return reply, dt, reply.compute_ms / 1000

    async def _verify(self, r: Request, request_id: str, route: SessionRoute, draft: draft_pb2.ProposeReply | None,
                      sampling, cache_namespace: str = "") -> tuple[verifier_pb2.VerifyReply, float]:
        resynced, session = False, route.session        # the route takes the new session once it answered
        while True:
            req = verifier_pb2.VerifyRequest(
                session_id=session, round=r.stats.rounds, committed_len=r.num_tokens, new_tokens=r.pending,
                sampling=sampling, cache_namespace=cache_namespace, prompt_len=len(r.prompt_ids))
            if draft is not None:
                req.draft_token_ids.extend(draft.token_ids)
                req.draft_dists.extend(draft.dists)             # q′ as the draft sent it: never decoded here
            t = time.perf_counter()
            try:
                reply = await route.replica.stub.Verify(req, timeout=self.settings.verify_timeout_s)
            except grpc.aio.AioRpcError as e:
                if replica_lost(e) and route.moves < len(self.verifiers.replicas) and \
                        self.verifiers.can_move(route.replica):
                    session = self._move(r, request_id, route, session, e)
                    continue
                if not resynced and session_lost(e):
                    resynced = True
                    log.warning("verifier lost session %s (%s): re-prefilling %d tokens", session, e.details(),
                                r.num_tokens)
                    if e.code() is grpc.StatusCode.FAILED_PRECONDITION:
                        await self._release(route.replica, session)  # out of step, but still open there: free it
                    session = f"{request_id}-{r.stats.rounds}-resync"    # as long after many resyncs as after one
                    r.pending = list(r.context)
                    continue
                raise
            dt = time.perf_counter() - t
            metrics.VERIFY_LATENCY.observe(dt)
            metrics.RPC_NETWORK.labels("verifier").observe(max(0.0, dt - (reply.compute_ms + reply.queue_ms) / 1000))
            s = r.stats
            s.add_rpc(draft=False, wall_s=dt, compute_ms=reply.compute_ms, queue_ms=reply.queue_ms,
                      wire_bytes=req.ByteSize() + reply.ByteSize())
            s.prefix_cached_tokens += reply.cached_tokens
            s.max_verify_batch_size = max(s.max_verify_batch_size, reply.batch_size)
            route.session = session
            return reply, dt

    async def _release(self, replica: Replica, session: str) -> None:
        try:
            await replica.stub.Release(verifier_pb2.ReleaseRequest(session_id=session), timeout=5)
        except (grpc.aio.AioRpcError, asyncio.CancelledError):
            pass                                                # the verifier's TTL frees it anyway
