"""Continuous batching over verify steps: concurrent Verify calls of different sessions share one forward pass.

Calls are queued (bounded: a full queue is refused at once, never waited on); one engine thread (a BatchWorker,
common/engine/batch_worker.py) takes every queued call, checks each against its session (round, committed
length; a retried round replays its reply), runs one batched target pass, applies the rejection sampler and
rolls each session's KV back to its accepted prefix. Release and the expiry of idle sessions run on the same
thread, between passes. No gRPC here: the servicer converts messages and awaits the futures.
"""
from __future__ import annotations

import logging
import time
from concurrent.futures import Future
from dataclasses import dataclass

from common.engine.batch_worker import BatchedEngine, BatchWorker, Job
from common.engine.forward_io import SequenceChunk
from common.errors import RoundMismatchError, SpecdError, UnknownSessionError
from common.speculative.proposal import DraftProposal
from common.speculative.rejection import RejectionSampler, VerifyInput
from common.speculative.params import SamplingParams
from common.telemetry.metrics import VERIFIER_BATCH_SIZE
from common.telemetry.tracing import attached
from common.validation import check_fits_context, check_id, check_token_ids
from verifier_service.sessions import Session, SessionTable, VerifyResult

log = logging.getLogger(__name__)

EXPIRY_TICK_S = 1.0          # idle sessions are looked for at least this often, even without traffic


@dataclass(slots=True)
class VerifyCall:
    session_id: str
    round: int
    committed_len: int
    new_tokens: list[int]
    proposal: DraftProposal
    params: SamplingParams
    enqueued: float = 0.0
    trace_context: object = None   # the OpenTelemetry Context of the RPC that queued it (set by the servicer)


class VerifierEngine(BatchedEngine):
    def __init__(self, executor, k_max: int = 8, max_queue: int = 256, max_batch: int = 64,
                 session_ttl_s: float = 300.0, max_sessions: int = 1024):
        self.executor = executor
        self.k_max = k_max
        self.vocab_size = executor.model_config.vocab_size
        self.max_model_len = executor.runner.max_model_len
        self.sessions = SessionTable(session_ttl_s, max_sessions)     # touched on the engine thread only
        self.sampler = RejectionSampler()
        self._worker: BatchWorker[VerifyCall] = BatchWorker(
            self._run_batch, name="verify", max_batch=max_batch, max_queue=max_queue,
            on_tick=self._expire_sessions, tick_s=EXPIRY_TICK_S)

    # ---- API used by the servicer (any thread) -----------------------------------------------------------
    def submit(self, call: VerifyCall) -> Future:
        """Queue one round; the future resolves to a VerifyResult. Bad input raises ValueError at once."""
        self._validate(call)
        call.enqueued = time.perf_counter()
        return self._worker.submit(call)

    def release(self, session_id: str) -> bool:
        """Free a session's KV; runs on the engine thread between passes, never waits behind the queue."""
        return self._worker.control(lambda: self._release(session_id)).result(timeout=60)

    def shutdown(self) -> None:
        self._worker.shutdown()
        for session in self.sessions.all():
            self.executor.free(session.seq_id)

    # ---- engine thread ------------------------------------------------------------------------------------
    def _release(self, session_id: str) -> bool:
        session = self.sessions.pop(session_id)
        if session is None:
            return False
        self.executor.free(session.seq_id)
        return True

    def _expire_sessions(self) -> None:
        for session in self.sessions.expired():
            log.info("session %s idle past its TTL: released", session.session_id)
            self._release(session.session_id)

    def _run_batch(self, batch: list[Job]) -> int:
        """The worker's batch step: admit each call against its session, then verify the runnable ones together."""
        runnable: list[tuple[VerifyCall, Future, Session]] = []
        for job in batch:
            call, fut = job.item, job.future
            try:
                session, replay = self._admit(call)
            except SpecdError as e:
                fut.set_exception(e)
                continue
            if replay is not None:
                fut.set_result(replay)
            elif any(s is session for _, _, s in runnable):
                fut.set_exception(RoundMismatchError(f"session {call.session_id}: round {call.round} sent twice "
                                                     "concurrently", session.next_round))
            else:
                runnable.append((call, fut, session))
        if not runnable:
            return 0
        try:
            return self._verify_batch(runnable)
        except Exception:
            # The KV may hold unverified drafts: drop the batch's sessions (a gateway re-prefills on NOT_FOUND);
            # the worker hands the error to every caller of the batch and goes on.
            log.exception("verify batch of %d failed: its sessions are dropped", len(runnable))
            for _, _, session in runnable:
                self._release(session.session_id)
            raise

    def _verify_batch(self, runnable: list[tuple[VerifyCall, Future, Session]]) -> int:
        """One target pass over every runnable call; -> how many shared it (0: the pass was refused)."""
        t = time.perf_counter()
        chunks = [SequenceChunk(s.seq_id, c.new_tokens + c.proposal.token_ids, num_logits=c.proposal.k + 1)
                  for c, _, s in runnable]
        try:
            with attached(runnable[0][0].trace_context if len(runnable) == 1 else None):   # cache spans join it
                fwd = self.executor.forward(chunks)
        except (SpecdError, ValueError) as e:
            for call, fut, session in runnable:
                if session.last_result is None:                 # created by this call (round 0 or a resync)
                    self._drop_new_session(session)
                fut.set_exception(e)
            return 0
        outcomes = self.sampler([VerifyInput(row, c.proposal, c.params, c.round, c.committed_len)
                                 for (c, _, _), row in zip(runnable, fwd.logits)])
        compute_ms = (time.perf_counter() - t) * 1000
        VERIFIER_BATCH_SIZE.observe(len(runnable))
        for (call, fut, session), out, hit in zip(runnable, outcomes, fwd.cached_tokens):
            keep = call.committed_len + out.num_accepted
            with attached(call.trace_context):
                self.executor.truncate(session.seq_id, keep)
            session.kv_len = keep
            session.next_round = call.round + 1
            session.last_used = time.monotonic()
            session.last_result = VerifyResult(out.accepted, out.next_token, out.is_bonus, keep, call.round,
                                               len(runnable), compute_ms, (t - call.enqueued) * 1000, hit)
            fut.set_result(session.last_result)
        return len(runnable)

    def _admit(self, call: VerifyCall) -> tuple[Session, VerifyResult | None]:
        """Match a call to its session: (session, None) to run it, (session, reply) to replay a retry."""
        session = self.sessions.get(call.session_id)
        if session is None:
            # A new session, or one re-prefilled after a loss: the call carries every committed token. Its
            # round number is kept, so a resumed request draws from the same random streams.
            if call.committed_len != len(call.new_tokens):
                raise UnknownSessionError(f"session {call.session_id!r} is unknown here (expired, released or "
                                          "the verifier restarted): re-prefill it by sending every committed "
                                          "token as new_tokens")
            session = self.sessions.create(call.session_id)
            session.next_round = call.round
            return session, None
        if call.round == session.next_round - 1 and session.last_result is not None:
            return session, session.last_result                 # a retried round: same reply, KV untouched
        if call.round != session.next_round:
            raise RoundMismatchError(f"session {call.session_id!r}: round={call.round} but the session expects "
                                     f"round {session.next_round}", session.next_round)
        if session.kv_len + len(call.new_tokens) != call.committed_len:
            raise RoundMismatchError(
                f"session {call.session_id!r}: committed_len={call.committed_len} but the verifier holds "
                f"{session.kv_len} tokens + {len(call.new_tokens)} new", session.next_round)
        return session, None

    def _drop_new_session(self, session: Session) -> None:
        self.sessions.pop(session.session_id)
        self.executor.free(session.seq_id)

    def _validate(self, call: VerifyCall) -> None:
        """Input checks that need no session state (raised to the caller at once, as INVALID_ARGUMENT)."""
        check_id("session_id", call.session_id)
        check_token_ids("new_tokens", call.new_tokens, self.vocab_size)
        if not 0 <= call.proposal.k <= self.k_max:
            raise ValueError(f"draft_token_ids: K={call.proposal.k} must be in [0, {self.k_max}]")
        call.proposal.validate(self.vocab_size, call.params.greedy or call.proposal.k == 0)
        check_fits_context("committed_len", call.committed_len, call.proposal.k, self.max_model_len, "K")
