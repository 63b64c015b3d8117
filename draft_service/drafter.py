"""The draft service's engine: batched proposals from the full context, with a soft, LRU-bounded KV cache.

Every Propose carries the whole committed context, so correctness never depends on what this replica has
cached: the cache only saves recomputation. A request's sequence is found by its request id; the longest
prefix its KV shares with the new context is kept (rejected drafts fall away) and only the rest is fed.
Least recently used sequences are evicted past `max_cached_sequences`, or when the KV cache runs out.

Concurrent Propose calls are batched: one engine thread takes every queued call and drafts them together
(each draft step of all of them is one forward pass), the same continuous batching the verifier does. Two
calls of one request in the same batch would share a sequence, so the later one waits for the next batch.
No gRPC here: the servicer converts messages and awaits the futures.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from collections import OrderedDict, deque
from concurrent.futures import Future
from dataclasses import dataclass

from common.errors import KVCacheExhaustedError, SpecdError
from common.speculative.proposers.draft_model import DraftModelProposer
from common.speculative.proposal import DraftProposal
from common.speculative.proposers import ProposeRequest
from common.speculative.sampling import SamplingParams
from common.telemetry.metrics import DRAFT_BATCH_SIZE
from common.telemetry.tracing import attached, current_context

log = logging.getLogger(__name__)

MAX_REQUEST_ID_CHARS = 128          # the id keys the soft cache: bounded like the verifier's session ids


class DraftQueueFullError(SpecdError):
    """The propose queue is at its bound: the caller should back off (RESOURCE_EXHAUSTED)."""


@dataclass(slots=True)
class ProposeCall:
    request_id: str
    context: list[int]
    k: int
    params: SamplingParams
    round_index: int
    enqueued: float = 0.0
    trace_context: object = None   # the OpenTelemetry Context of the RPC that queued it


@dataclass(slots=True)
class DraftResult:
    proposal: DraftProposal
    cached_tokens: int          # context tokens served from the soft cache
    compute_s: float            # the batch's drafting time
    queue_s: float              # time the call waited before its batch started
    batch_size: int


class Drafter:
    def __init__(self, runner, k_max: int = 8, max_cached_sequences: int = 64, max_support: int = 32,
                 max_batch: int = 32, max_queue: int = 256):
        if max_batch < 1 or max_queue < 1:
            raise ValueError(f"max_batch={max_batch}, max_queue={max_queue}: both must be >= 1")
        self.runner = runner
        self.k_max = k_max
        self.max_cached_sequences = max_cached_sequences
        self.max_batch = min(max_batch, runner.config.max_num_seqs)     # a batch's sequences must all fit
        self.proposer = DraftModelProposer(runner, max_support=max_support)
        self.vocab_size = runner.model_config.vocab_size
        self.max_model_len = runner.max_model_len
        self._seq_of: OrderedDict[str, int] = OrderedDict()     # request id -> sequence, LRU order
        self._next_seq = 1
        self._queue: queue.Queue = queue.Queue(maxsize=max_queue)
        self._deferred: list[tuple[ProposeCall, Future]] = []   # same request twice: next batch
        self.batch_sizes: deque[int] = deque(maxlen=4096)       # the latest batches (tests read it)
        self._thread = threading.Thread(target=self._loop, name="drafter", daemon=True)
        self._thread.start()

    # ---- API (any thread) ---------------------------------------------------------------------------------
    def submit(self, request_id: str, context: list[int], k: int, params: SamplingParams,
               round_index: int) -> Future:
        """Queue one proposal; the future resolves to a DraftResult. Bad input raises ValueError at once."""
        self._validate(request_id, context, k)
        call = ProposeCall(request_id, list(context), k, params, round_index, time.perf_counter(),
                           current_context())
        fut: Future = Future()
        try:
            self._queue.put_nowait((call, fut))
        except queue.Full:
            raise DraftQueueFullError(f"propose queue full ({self._queue.maxsize} calls waiting); "
                                      "retry later") from None
        return fut

    def propose(self, request_id: str, context: list[int], k: int, params: SamplingParams,
                round_index: int, timeout: float | None = None) -> DraftResult:
        return self.submit(request_id, context, k, params, round_index).result(timeout)

    @property
    def queue_depth(self) -> int:
        return self._queue.qsize()

    @property
    def cached_sequences(self) -> int:
        return len(self._seq_of)

    def shutdown(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=30)

    # ---- engine thread ------------------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            if self._deferred:
                batch, self._deferred = self._deferred, []
            else:
                item = self._queue.get()
                if item is None:
                    return
                batch = [item]
            stop = self._fill(batch)
            runnable, seen = [], set()
            for call, fut in batch:
                if call.request_id and call.request_id in seen:
                    self._deferred.append((call, fut))
                else:
                    seen.add(call.request_id)
                    runnable.append((call, fut))
            self._run(runnable)
            if stop:
                return

    def _fill(self, batch: list) -> bool:
        """Add queued calls up to max_batch; True when shutdown was asked for."""
        while len(batch) < self.max_batch:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return False
            if item is None:
                return True
            batch.append(item)
        return False

    def _run(self, batch: list[tuple[ProposeCall, Future]]) -> None:
        # A caller that went away (cancelled, past the gateway's draft deadline) cancelled its future: skip it,
        # and never set a result on a cancelled future (InvalidStateError would end this thread).
        batch = [(call, fut) for call, fut in batch if fut.set_running_or_notify_cancel()]
        if not batch:
            return
        start = time.perf_counter()
        try:
            seqs = [self._sequence_for(call.request_id) for call, _ in batch]
            cached = [self.proposer.cached_prefix(seq, call.context) for seq, (call, _) in zip(seqs, batch)]
            requests = [ProposeRequest(seq, call.context, call.k, call.params, call.round_index)
                        for seq, (call, _) in zip(seqs, batch)]
            with attached(batch[0][0].trace_context if len(batch) == 1 else None):   # cache spans join it
                proposals = self._propose(requests, seqs)
        except Exception as e:  # noqa: BLE001 - handed to every caller of the batch
            log.warning("draft batch of %d failed: %s", len(batch), e)
            for _, fut in batch:
                fut.set_exception(e)
            return
        compute_s = time.perf_counter() - start
        self.batch_sizes.append(len(batch))
        DRAFT_BATCH_SIZE.observe(len(batch))
        for (call, fut), proposal, hit in zip(batch, proposals, cached):
            fut.set_result(DraftResult(proposal, hit, compute_s, start - call.enqueued, len(batch)))

    def _propose(self, requests: list[ProposeRequest], seqs: list[int]) -> list[DraftProposal]:
        # Room first: the runner holds at most max_cached_sequences + 1 sequences, and a batch can bring several
        # new ones (a full cache + 2 new requests failed with "too many sequences").
        self._evict(keep=set(seqs), limit=max(self.max_cached_sequences, len(seqs)))
        try:
            proposals = self.proposer.propose(requests)
        except KVCacheExhaustedError:
            # Make room by dropping every other cached sequence (this batch's KV was released by the
            # proposer, so it is recomputed); if the batch alone still does not fit, draft one at a time.
            self._evict(keep=set(seqs), limit=len(seqs))
            try:
                proposals = self.proposer.propose(requests)
            except KVCacheExhaustedError:
                proposals = []
                for r in requests:
                    self._evict(keep={r.seq_id}, limit=1)
                    proposals += self.proposer.propose([r])
        self._evict(keep=set(seqs), limit=max(self.max_cached_sequences, len(seqs)))
        return proposals

    def _validate(self, request_id: str, context: list[int], k: int) -> None:
        if len(request_id) > MAX_REQUEST_ID_CHARS:
            raise ValueError(f"request_id: {len(request_id)} characters, must be <= {MAX_REQUEST_ID_CHARS}")
        if not context:
            raise ValueError("context_token_ids: empty")
        if not 1 <= k <= self.k_max:
            raise ValueError(f"k={k}: must be in [1, {self.k_max}]")
        if any(not 0 <= t < self.vocab_size for t in context):
            raise ValueError(f"context_token_ids: token id outside the vocabulary [0, {self.vocab_size})")
        if len(context) + k > self.max_model_len:
            raise ValueError(f"context_token_ids: {len(context)} tokens + k={k} exceeds "
                             f"max_model_len={self.max_model_len}")

    def _sequence_for(self, request_id: str) -> int:
        if request_id and request_id in self._seq_of:
            self._seq_of.move_to_end(request_id)
            return self._seq_of[request_id]
        seq = self._next_seq
        self._next_seq += 1
        self._seq_of[request_id or f"anonymous-{seq}"] = seq
        return seq

    def _evict(self, keep: set[int], limit: int) -> None:
        """Release least recently used sequences (never those in `keep`) until at most `limit` remain."""
        for rid, seq in list(self._seq_of.items()):
            if len(self._seq_of) <= limit:
                break
            if seq not in keep:
                del self._seq_of[rid]
                self.proposer.release(seq)
