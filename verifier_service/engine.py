"""Continuous batching over verify steps: concurrent Verify calls of different sessions share one forward pass.

Calls are queued (bounded: a full queue is refused at once, never waited on); one engine thread takes every
queued call, checks each against its session (round, committed length; a retried round replays its reply),
runs one batched target pass, applies the rejection sampler and rolls each session's KV back to its accepted
prefix. No gRPC here: the servicer converts messages and awaits the futures.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass

from common.engine.model_runner import SequenceChunk
from common.errors import SpecdError
from common.speculative.proposal import DraftProposal
from common.speculative.rejection import RejectionSampler, VerifyInput
from common.speculative.sampling import SamplingParams
from common.telemetry.metrics import VERIFIER_BATCH_SIZE
from common.telemetry.tracing import attached
from verifier_service.sessions import (RoundMismatchError, Session, SessionTable, UnknownSessionError,
                                       VerifyResult)

log = logging.getLogger(__name__)


class QueueFullError(SpecdError):
    """The verify queue is at its bound: the caller should back off (RESOURCE_EXHAUSTED)."""


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


class VerifierEngine:
    def __init__(self, executor, k_max: int = 8, max_queue: int = 256, max_batch: int = 64,
                 session_ttl_s: float = 300.0, max_sessions: int = 1024):
        self.executor = executor
        self.k_max = k_max
        self.max_batch = max_batch
        self.vocab_size = executor.model_config.vocab_size
        self.max_model_len = executor.runner.max_model_len
        self.sessions = SessionTable(session_ttl_s, max_sessions)
        self.sampler = RejectionSampler()
        self._queue: queue.Queue = queue.Queue(maxsize=max_queue)
        self._lock = threading.Lock()              # guards sessions against Release from other threads
        self._stop = threading.Event()
        self.batch_sizes: deque[int] = deque(maxlen=4096)   # the latest forward passes (tests read it)
        self._thread = threading.Thread(target=self._loop, name="verifier-engine", daemon=True)
        self._thread.start()

    # ---- API used by the servicer (any thread) -----------------------------------------------------------
    def submit(self, call: VerifyCall) -> Future:
        self._validate(call)
        call.enqueued = time.perf_counter()
        fut: Future = Future()
        try:
            self._queue.put_nowait((call, fut))
        except queue.Full:
            raise QueueFullError(f"verify queue full ({self._queue.maxsize} calls waiting); retry later") from None
        return fut

    def release(self, session_id: str) -> bool:
        fut: Future = Future()
        self._queue.put(("release", session_id, fut))       # released on the engine thread, between passes
        return fut.result(timeout=60)

    @property
    def queue_depth(self) -> int:
        return self._queue.qsize()

    def shutdown(self) -> None:
        self._stop.set()
        self._queue.put(None)
        self._thread.join(timeout=30)
        for session in list(self.sessions._sessions.values()):
            self.executor.free(session.seq_id)

    # ---- engine thread ------------------------------------------------------------------------------------
    def _loop(self) -> None:
        while not self._stop.is_set():
            item = self._queue.get()
            if item is None:
                break
            batch = []
            while True:
                if isinstance(item, tuple) and item[0] == "release":
                    _, sid, fut = item
                    fut.set_result(self._release(sid))
                elif item is not None:
                    batch.append(item)
                if len(batch) >= self.max_batch:
                    break
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
            if batch:
                self._run_batch(batch)
            self._expire_sessions()

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

    def _run_batch(self, batch: list[tuple[VerifyCall, Future]]) -> None:
        runnable: list[tuple[VerifyCall, Future, Session]] = []
        for call, fut in batch:
            # A caller that went away (cancelled, past its deadline) cancelled its future: skip its work, and
            # never set a result on a cancelled future (InvalidStateError would end this thread).
            if not fut.set_running_or_notify_cancel():
                continue
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
            return
        try:
            self._verify_batch(runnable)
        except Exception as e:  # noqa: BLE001 - the engine thread must outlive any one batch
            # The KV may hold unverified drafts: drop the batch's sessions (a gateway re-prefills on NOT_FOUND).
            log.exception("verify batch of %d failed: its sessions are dropped", len(runnable))
            for call, fut, session in runnable:
                self._release(session.session_id)
                if not fut.done():
                    fut.set_exception(e)

    def _verify_batch(self, runnable: list[tuple[VerifyCall, Future, Session]]) -> None:
        t = time.perf_counter()
        chunks = [SequenceChunk(s.seq_id, c.new_tokens + c.proposal.token_ids, num_logits=c.proposal.k + 1)
                  for c, _, s in runnable]
        try:
            with attached(runnable[0][0].trace_context if len(runnable) == 1 else None):   # cache spans join it
                logits = self.executor.forward(chunks)
        except (SpecdError, ValueError) as e:
            for call, fut, session in runnable:
                if session.last_result is None:                 # created by this call (round 0 or a resync)
                    self._drop_new_session(session)
                fut.set_exception(e)
            return
        cached = self.executor.last_cached_tokens
        outcomes = self.sampler([VerifyInput(row, c.proposal, c.params, c.round, c.committed_len)
                                 for (c, _, _), row in zip(runnable, logits)])
        compute_ms = (time.perf_counter() - t) * 1000
        self.batch_sizes.append(len(runnable))
        VERIFIER_BATCH_SIZE.observe(len(runnable))
        for (call, fut, session), out, hit in zip(runnable, outcomes, cached):
            keep = call.committed_len + out.num_accepted
            with attached(call.trace_context):
                self.executor.truncate(session.seq_id, keep)
            session.kv_len = keep
            session.next_round = call.round + 1
            session.last_used = time.monotonic()
            session.last_result = VerifyResult(out.accepted, out.next_token, out.is_bonus, keep, call.round,
                                               len(runnable), compute_ms, (t - call.enqueued) * 1000, hit)
            fut.set_result(session.last_result)

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
        if not call.session_id or len(call.session_id) > 128:
            raise ValueError("session_id: must be 1..128 characters")
        if not call.new_tokens:
            raise ValueError("new_tokens: at least one committed token the verifier has not seen is required")
        if not 0 <= call.proposal.k <= self.k_max:
            raise ValueError(f"draft_token_ids: K={call.proposal.k} must be in [0, {self.k_max}]")
        if any(not 0 <= t < self.vocab_size for t in call.new_tokens):
            raise ValueError(f"new_tokens: token id outside the vocabulary [0, {self.vocab_size})")
        call.proposal.validate(self.vocab_size, call.params.greedy or call.proposal.k == 0)
        if call.committed_len + call.proposal.k > self.max_model_len:
            raise ValueError(f"committed_len={call.committed_len} + K={call.proposal.k} exceeds "
                             f"max_model_len={self.max_model_len}")
