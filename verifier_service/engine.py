"""Continuous batching over verify steps: concurrent Verify calls of different sessions share one forward pass.

Calls are queued (bounded: a full queue is refused at once, never waited on); one engine thread (a BatchWorker,
common/engine/batch_worker.py) takes every queued call, checks each against its session (round, committed
length; a retried round replays its reply), runs one batched target pass, applies the rejection sampler and
rolls each session's KV back to its accepted prefix. Release and the expiry of idle sessions run on the same
thread, between passes. No gRPC here: the servicer converts messages and awaits the futures.

KV blocks are counted before every pass, so no call fails because another one is long: a new session waits for
its blocks or is refused up front (verifier_service/admission.py), and a running session that cannot grow by its
new tokens and drafts makes room by preempting the sessions with the least progress (their KV freed; their next
call gets NOT_FOUND and the gateway re-prefills them from its history, with identical output).
"""
from __future__ import annotations

import logging
import time
from concurrent.futures import Future
from dataclasses import dataclass

from common.engine.batch_worker import BatchedEngine, BatchWorker, Job
from common.engine.forward_io import SequenceChunk
from common.errors import (EngineStoppedError, KVCacheExhaustedError, RoundMismatchError, SpecdError,
                           UnknownSessionError)
from common.speculative.penalties import TokenHistory
from common.speculative.proposal import DraftProposal
from common.speculative.rejection import RejectionSampler, VerifyInput
from common.speculative.params import SamplingParams
from common.telemetry.metrics import VERIFIER_BATCH_SIZE, VERIFIER_PREEMPTIONS
from common.telemetry.tracing import attached
from common.validation import (check_cache_namespace, check_fits_context, check_id, check_prompt_len,
                               check_token_ids)
from common.kv.block_allocator import blocks_for
from verifier_service.admission import AdmissionPolicy, AdmissionQueue
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
    cache_namespace: str = ""      # prefix-cache tenant ("" = shared); read when the call creates the session
    prompt_len: int = 0            # how many committed tokens are the prompt (penalties count the output after it)
    enqueued: float = 0.0
    trace_context: object = None   # the OpenTelemetry Context of the RPC that queued it (set by the servicer)


Running = tuple[Job, Session]    # a call of an open session, to run in the next pass


class VerifierEngine(BatchedEngine):
    def __init__(self, executor, k_max: int = 8, max_queue: int = 256, max_batch: int = 64,
                 session_ttl_s: float = 300.0, max_sessions: int = 1024, max_waiting: int = 64,
                 max_wait_s: float = 60.0):
        """`max_waiting`: new sessions that may wait for KV blocks (one more is refused); `max_wait_s`: how long."""
        self.executor = executor
        self.k_max = k_max
        self.vocab_size = executor.model_config.vocab_size
        self.max_model_len = executor.runner.max_model_len
        self.block_size = executor.runner.block_size
        # The runner refuses a pass with more sequences than max_num_seqs: admission keeps below both bounds.
        self.sessions = SessionTable(session_ttl_s, min(max_sessions, executor.runner.config.max_num_seqs))
        self.admission = AdmissionQueue(AdmissionPolicy.for_cache(
            executor.allocator.num_blocks, self.block_size, k_max, max_waiting=max_waiting, max_wait_s=max_wait_s))
        self.preemptions = 0                                            # (tests read it)
        self.sampler = RejectionSampler()
        self._worker: BatchWorker[VerifyCall] = BatchWorker(
            self._run_batch, name="verify", max_batch=max_batch, max_queue=max_queue,
            on_tick=self._on_tick, tick_s=EXPIRY_TICK_S)

    # ---- API used by the servicer (any thread) -----------------------------------------------------------
    def submit(self, call: VerifyCall) -> Future:
        """Queue one round; the future resolves to a VerifyResult. Bad input raises ValueError at once."""
        self._validate(call)
        call.enqueued = time.perf_counter()
        return self._worker.submit(call)

    def release(self, session_id: str) -> bool:
        """Free a session's KV; runs on the engine thread between passes, never waits behind the queue."""
        return self._worker.control(lambda: self._release(session_id)).result(timeout=60)

    @property
    def waiting(self) -> int:
        """New sessions waiting for KV blocks (read on any thread: a snapshot)."""
        return len(self.admission)

    def load(self) -> dict[str, int]:
        """How busy this replica is (any thread, a snapshot of counters; nothing waits behind the queue)."""
        allocator = self.executor.allocator
        return {"sessions": len(self.sessions), "waiting_sessions": self.waiting, "queue_depth": self.queue_depth,
                "free_kv_blocks": allocator.num_free, "total_kv_blocks": allocator.num_blocks,
                "max_sessions": self.sessions.max_sessions}

    def shutdown(self) -> None:
        self._worker.shutdown()
        for w in self.admission.take(lambda w: True):
            self._fail(w.job, EngineStoppedError("verify engine shut down before this session was admitted"))
        for session in self.sessions.all():
            self.executor.free(session.seq_id)

    # ---- engine thread ------------------------------------------------------------------------------------
    def abandon(self, future: Future) -> None:
        """The caller of `future` went away: if its call still waits for KV blocks, drop it now (not at max_wait_s).
        Never blocks; a call already running finishes as usual."""
        try:
            self._worker.control(lambda: self._drop_waiting(future))
        except EngineStoppedError:
            pass                                    # shutting down: every waiter fails anyway

    def _drop_waiting(self, future: Future) -> None:
        for w in self.admission.take(lambda w: w.job.future is future):
            self._fail(w.job, EngineStoppedError(f"session {w.session_id!r}: its caller went away while it waited "
                                                 "for KV blocks"))

    def _release(self, session_id: str) -> bool:
        for w in self.admission.take(lambda w: w.session_id == session_id):
            self._fail(w.job, UnknownSessionError(f"session {session_id!r} released while waiting for KV blocks"))
        session = self.sessions.pop(session_id)
        if session is None:
            return False
        self.executor.free(session.seq_id)
        return True

    def _expire_sessions(self) -> None:
        for session in self.sessions.expired():
            log.info("session %s idle past its TTL: released", session.session_id)
            self._release(session.session_id)

    def _on_tick(self) -> None:
        """After every pass and at least every tick: expire, time waiters out, admit what now fits."""
        self._expire_sessions()
        for w in self.admission.timed_out():
            self._fail(w.job, KVCacheExhaustedError(
                f"session {w.session_id!r}: waited max_wait_s={self.admission.policy.max_wait_s} for {w.blocks} "
                f"KV blocks ({self.executor.allocator.num_free} of {self.admission.policy.num_blocks} free)"))
        if len(self.admission):
            self._step([], [])

    def _run_batch(self, batch: list[Job]) -> int:
        """The worker's batch step: match each call to its session, admit new ones, verify what fits together."""
        self._expire_sessions()                 # idle sessions give their blocks back before anyone is admitted
        running: list[Running] = []
        fresh: list[Job] = []
        for job in batch:
            self._dispatch(job, running, fresh)
        return self._step(running, fresh)

    def _dispatch(self, job: Job, running: list[Running], fresh: list[Job]) -> None:
        """Answer a call at once (error, replayed retry), or file it as running or as a new session."""
        call, fut = job.item, job.future
        try:
            session, replay = self._match(call)
        except SpecdError as e:
            fut.set_exception(e)
            return
        if replay is not None:
            fut.set_result(replay)
        elif session is None:
            fresh.append(job)
        elif any(s is session for _, s in running):
            fut.set_exception(RoundMismatchError(f"session {call.session_id}: round {call.round} sent twice "
                                                 "concurrently", session.next_round))
        else:
            running.append((job, session))

    def _step(self, running: list[Running], fresh: list[Job]) -> int:
        """Make room for the running calls, admit waiting sessions into what is left, run one pass over both."""
        self.admission.take(lambda w: w.job.future.done())                 # failed by the worker: forget
        for job in fresh:
            try:
                self.admission.offer(job, len(job.item.new_tokens) + job.item.proposal.k)
            except KVCacheExhaustedError as e:
                job.future.set_exception(e)
        for w in self.admission.take(lambda w: self.sessions.get(w.session_id) is not None):
            self._dispatch(w.job, running, [])          # a retried first call whose session now exists: replay
        running, growth = self._make_room(running)
        free = self.executor.allocator.num_free - growth
        admitted = self.admission.admit(free, self.sessions.max_sessions - len(self.sessions),
                                        idle=len(self.sessions) == 0)
        free -= sum(w.blocks for w in admitted)
        for w in self.admission.overflow():
            w.job.future.set_exception(KVCacheExhaustedError(self.admission.full_message(w, free)))
        runnable = [(job.item, job.future, session) for job, session in running]
        for w in admitted:
            # A new session, or one re-prefilled after a loss: its round number is kept, so a resumed request
            # draws from the same random streams.
            session = self.sessions.create(w.session_id)
            session.next_round = w.job.item.round
            runnable.append((w.job.item, w.job.future, session))
        if not runnable:
            return 0
        try:
            return self._verify_batch(runnable)
        except Exception as e:  # noqa: BLE001 - confined to this pass's callers; the thread goes on
            # The KV may hold unverified drafts: drop the batch's sessions (a gateway re-prefills on NOT_FOUND).
            log.exception("verify batch of %d failed: its sessions are dropped", len(runnable))
            for _, fut, session in runnable:
                self._release(session.session_id)
                if not fut.done():
                    fut.set_exception(e)
            return 0

    def _make_room(self, running: list[Running]) -> tuple[list[Running], int]:
        """Free blocks for the running calls' growth; -> (the calls still to run, the blocks they will take).

        A call that needs more than the whole cache fails alone. Otherwise, while the growth does not fit, the
        session with the least progress (fewest rounds: a re-prefilled one keeps its round, hence its rank; the
        newest among equals) is preempted, whether its call is in this pass or still to come."""
        bs, alloc = self.block_size, self.executor.allocator
        kept: list[tuple[Job, Session, int]] = []
        for job, session in running:
            call, held = job.item, self.executor.num_tokens(session.seq_id)
            total = blocks_for(held + len(call.new_tokens) + call.proposal.k, bs)
            if total > alloc.num_blocks:
                self._release(session.session_id)
                job.future.set_exception(KVCacheExhaustedError(
                    f"session {call.session_id!r}: {held} cached + {len(call.new_tokens)} new + K={call.proposal.k} "
                    f"tokens need {total} KV blocks of {bs} tokens, the whole cache holds {alloc.num_blocks}"))
                continue
            kept.append((job, session, total - blocks_for(held, bs)))
        need = sum(g for _, _, g in kept)
        for victim in sorted(self.sessions.all(), key=lambda s: (s.next_round, -s.seq_id)):
            if need <= alloc.num_free:
                break
            if self.executor.num_tokens(victim.seq_id) == 0:
                continue
            log.info("session %s preempted: KV cache full (%d blocks needed to grow, %d free)", victim.session_id,
                     need, alloc.num_free)
            self._release(victim.session_id)
            self.preemptions += 1
            VERIFIER_PREEMPTIONS.inc()
            for i, (job, session, g) in enumerate(kept):
                if session is victim:
                    del kept[i]
                    need -= g
                    job.future.set_exception(UnknownSessionError(
                        f"session {victim.session_id!r} was preempted to free KV blocks for older sessions: "
                        "re-prefill it by sending every committed token as new_tokens"))
                    break
        return [(job, session) for job, session, _ in kept], need

    def _verify_batch(self, runnable: list[tuple[VerifyCall, Future, Session]]) -> int:
        """One target pass over every runnable call; -> how many shared it (0: the pass was refused)."""
        t = time.perf_counter()
        chunks = [SequenceChunk(s.seq_id, c.new_tokens + c.proposal.token_ids, num_logits=c.proposal.k + 1,
                                cache_namespace=c.cache_namespace) for c, _, s in runnable]
        try:
            with attached(runnable[0][0].trace_context if len(runnable) == 1 else None):   # cache spans join it
                fwd = self.executor.forward(chunks)
        except (SpecdError, ValueError) as e:
            for call, fut, session in runnable:
                if session.last_result is None:                 # created by this call (round 0 or a resync)
                    self._drop_new_session(session)
                fut.set_exception(e)
            return 0
        outcomes = self.sampler([VerifyInput(row, c.proposal, c.params, c.round, c.committed_len, _history(c, s))
                                 for (c, _, s), row in zip(runnable, fwd.logits)])
        compute_ms = (time.perf_counter() - t) * 1000
        VERIFIER_BATCH_SIZE.observe(len(runnable))
        for (call, fut, session), out, hit in zip(runnable, outcomes, fwd.cached_tokens):
            keep = call.committed_len + out.num_accepted
            with attached(call.trace_context):
                self.executor.truncate(session.seq_id, keep)
            session.tokens += call.new_tokens + out.accepted
            session.next_round = call.round + 1
            session.last_used = time.monotonic()
            session.last_result = VerifyResult(out.accepted, out.next_token, out.is_bonus, keep, call.round,
                                               len(runnable), compute_ms, (t - call.enqueued) * 1000, hit,
                                               out.logprobs)
            fut.set_result(session.last_result)
        return len(runnable)

    def _match(self, call: VerifyCall) -> tuple[Session | None, VerifyResult | None]:
        """Match a call to its session: (session, None) to run it, (session, reply) to replay a retry,
        (None, None) for a new session (or one re-prefilled after a loss), which admission decides on."""
        session = self.sessions.get(call.session_id)
        if session is None:
            if call.committed_len != len(call.new_tokens):
                raise UnknownSessionError(f"session {call.session_id!r} is unknown here (expired, released, "
                                          "preempted or the verifier restarted): re-prefill it by sending every "
                                          "committed token as new_tokens")
            return None, None
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

    @staticmethod
    def _fail(job: Job, err: Exception) -> None:
        if not job.future.done():
            job.future.set_exception(err)

    def _validate(self, call: VerifyCall) -> None:
        """Input checks that need no session state (raised to the caller at once, as INVALID_ARGUMENT)."""
        check_id("session_id", call.session_id)
        check_cache_namespace("cache_namespace", call.cache_namespace)
        check_token_ids("new_tokens", call.new_tokens, self.vocab_size)
        if not 0 <= call.proposal.k <= self.k_max:
            raise ValueError(f"draft_token_ids: K={call.proposal.k} must be in [0, {self.k_max}]")
        call.proposal.validate(self.vocab_size, call.params.greedy or call.proposal.k == 0)
        check_fits_context("committed_len", call.committed_len, call.proposal.k, self.max_model_len, "K")
        check_prompt_len("prompt_len", call.prompt_len, call.committed_len, "committed_len")


def _history(call: VerifyCall, session: Session) -> TokenHistory | None:
    """The committed tokens before d_1 (the session's, then the call's new ones), when the call sets a penalty."""
    return TokenHistory(session.tokens + call.new_tokens, call.prompt_len) if call.params.penalized else None
