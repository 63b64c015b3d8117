"""The draft service's engine: batched proposals from the full context, with a soft, LRU-bounded KV cache.

Every Propose carries the whole committed context, so correctness never depends on what this replica has
cached: the cache only saves recomputation. A request's sequence is found by its request id; the longest
prefix its KV shares with the new context is kept (rejected drafts fall away) and only the rest is fed.
Least recently used sequences are evicted past `max_cached_sequences`, or to make room for a batch.

KV blocks are counted before every pass, as in the verifier (verifier_service/admission.py): a call that could
never fit the whole cache is refused at submit (RESOURCE_EXHAUSTED, the gateway drafts nothing that round); a batch
is split, in arrival order, into groups that fit the cache once the other sequences are evicted, run one after
another, so no call fails because others are long.

Concurrent Propose calls are batched: one engine thread takes every queued call and drafts them together
(each draft step of all of them is one forward pass): the BatchWorker the verifier uses too (common/engine). Two
calls of one request in the same batch would share a sequence, so the later one waits for the next batch.
No gRPC here: the servicer converts messages and awaits the futures.
"""
from __future__ import annotations

import time
from collections import OrderedDict
from concurrent.futures import Future
from dataclasses import dataclass

from common.engine.batch_worker import BatchedEngine, BatchWorker, Job
from common.errors import KVCacheExhaustedError
from common.kv.block_allocator import blocks_for
from common.speculative.proposers.draft_model import DraftModelProposer
from common.speculative.proposal import DraftProposal
from common.speculative.proposers import ProposeInput
from common.speculative.params import SamplingParams
from common.telemetry.metrics import DRAFT_BATCH_SIZE
from common.telemetry.tracing import attached, current_context
from common.validation import (check_cache_namespace, check_fits_context, check_id, check_prompt_len,
                               check_token_ids)

MAX_REQUEST_ID_CHARS = 128          # the id keys the soft cache: bounded like the verifier's session ids


@dataclass(slots=True)
class ProposeCall:
    request_id: str
    context: list[int]
    k: int
    params: SamplingParams
    round_index: int
    cache_namespace: str = ""      # prefix-cache tenant ("" = shared)
    prompt_len: int = 0            # how many of `context` are the prompt (for the request's penalties)
    guess_next: bool = False       # pre-draft: append the draft's own next token, then draft K after it
    enqueued: float = 0.0
    trace_context: object = None   # the OpenTelemetry Context of the RPC that queued it


@dataclass(slots=True)
class DraftResult:
    proposal: DraftProposal
    cached_tokens: int          # context tokens served from the soft cache
    compute_s: float            # the batch's drafting time
    queue_s: float              # time the call waited before its batch started
    batch_size: int


class Drafter(BatchedEngine):
    def __init__(self, runner, k_max: int = 8, max_cached_sequences: int = 64, max_support: int = 32,
                 max_batch: int = 32, max_queue: int = 256):
        self.runner = runner
        self.k_max = k_max
        self.max_cached_sequences = max_cached_sequences
        self.proposer = DraftModelProposer(runner, max_support=max_support)
        self.vocab_size = runner.model_config.vocab_size
        self.max_model_len = runner.max_model_len
        self._seq_of: OrderedDict[tuple[str, str], int] = OrderedDict()   # (namespace, request id) -> seq, LRU
        self._next_seq = 1
        # A batch's sequences must all fit the runner; two calls of one request would share a sequence.
        self._worker: BatchWorker[ProposeCall] = BatchWorker(
            self._run, name="propose", max_batch=min(max_batch, runner.config.max_num_seqs), max_queue=max_queue,
            batch_key=lambda call: (call.cache_namespace, call.request_id) if call.request_id else None)

    # ---- API (any thread) ---------------------------------------------------------------------------------
    def submit(self, request_id: str, context: list[int], k: int, params: SamplingParams,
               round_index: int, cache_namespace: str = "", prompt_len: int = 0, guess_next: bool = False) -> Future:
        """Queue one proposal; the future resolves to a DraftResult. Bad input raises ValueError at once.
        `cache_namespace`: the prefix-cache tenant ("" = shared); `prompt_len`: how many of `context` are the
        prompt (the penalties count the output after it); `guess_next`: a pre-draft (the draft appends its own
        most likely next token to `context`, then drafts K; the proposal's guessed_token_id says which)."""
        self._validate(request_id, context, k, cache_namespace, prompt_len, guess_next)
        return self._worker.submit(ProposeCall(request_id, list(context), k, params, round_index, cache_namespace,
                                               prompt_len, guess_next, time.perf_counter(), current_context()))

    def propose(self, request_id: str, context: list[int], k: int, params: SamplingParams,
                round_index: int, timeout: float | None = None, cache_namespace: str = "",
                prompt_len: int = 0, guess_next: bool = False) -> DraftResult:
        return self.submit(request_id, context, k, params, round_index, cache_namespace, prompt_len,
                           guess_next).result(timeout)

    @property
    def cached_sequences(self) -> int:
        return len(self._seq_of)

    def shutdown(self) -> None:
        self._worker.shutdown()

    # ---- engine thread ------------------------------------------------------------------------------------
    def _run(self, batch: list[Job]) -> int:
        """The worker's batch step: draft the batch's calls together, in groups that each fit the KV cache."""
        calls: list[ProposeCall] = [job.item for job in batch]
        start = time.perf_counter()
        seqs = [self._sequence_for(call.request_id, call.cache_namespace) for call in calls]
        requests = [ProposeInput(seq, call.context, call.k, call.params, call.round_index, call.cache_namespace,
                                 call.prompt_len, call.guess_next) for seq, call in zip(seqs, calls)]
        proposals: list[DraftProposal] = []
        later = set(seqs)
        for group in self._groups(requests):
            later -= {r.seq_id for r in group}
            with attached(calls[0].trace_context if len(calls) == 1 else None):   # cache spans join it
                proposals += self._propose(group, later)
        compute_s = time.perf_counter() - start
        DRAFT_BATCH_SIZE.observe(len(batch))
        for job, proposal in zip(batch, proposals):
            job.future.set_result(DraftResult(proposal, proposal.cached_tokens, compute_s,
                                              start - job.item.enqueued, len(batch)))
        return len(batch)

    def _blocks(self, context_len: int, k: int) -> int:
        """Blocks a call's sequence holds at the end of its drafting: the context and K - 1 drafts (the last
        draft is never fed)."""
        return blocks_for(context_len + k - 1, self.runner.config.block_size)

    def _groups(self, requests: list[ProposeInput]) -> list[list[ProposeInput]]:
        """Consecutive runs of `requests` whose blocks together fit the whole cache (each one alone does: submit)."""
        groups: list[list[ProposeInput]] = []
        used = self.runner.allocator.num_blocks
        for r in requests:
            need = self._blocks(len(r.context) + r.guess_next, r.k)
            if used + need > self.runner.allocator.num_blocks:
                groups.append([])
                used = 0
            groups[-1].append(r)
            used += need
        return groups

    def _propose(self, requests: list[ProposeInput], later: set[int]) -> list[DraftProposal]:
        """Draft one group; `later`: the sequences of the batch's next groups (kept: they have not run yet)."""
        keep = {r.seq_id for r in requests} | later
        # Room first: the runner holds at most max_cached_sequences + 1 sequences, and a batch can bring several
        # new ones (a full cache + 2 new requests failed with "too many sequences"); then the group's blocks.
        self._evict(keep=keep, limit=max(self.max_cached_sequences, len(keep)))
        self._evict_for(requests, later)
        proposals = self.proposer.propose(requests)
        self._evict(keep=keep, limit=max(self.max_cached_sequences, len(keep)))
        return proposals

    def _evict_for(self, requests: list[ProposeInput], later: set[int]) -> None:
        """Release least recently used sequences until the blocks `requests` will take are free. The sequences of
        the batch's later groups keep their entry and lose only their KV (recomputed when their group runs)."""
        bs, alloc = self.runner.config.block_size, self.runner.allocator
        group = {r.seq_id for r in requests}
        # What the group's sequences hold now is theirs to reuse (their rollback to the shared prefix frees the rest).
        need = sum(self._blocks(len(r.context) + r.guess_next, r.k) - blocks_for(self.runner.num_tokens(r.seq_id), bs)
                   for r in requests)
        for rid, seq in list(self._seq_of.items()):
            if need <= alloc.num_free:
                break
            if seq in group:
                continue
            if seq not in later:
                del self._seq_of[rid]
            self.proposer.release(seq)

    def _validate(self, request_id: str, context: list[int], k: int, cache_namespace: str, prompt_len: int,
                  guess_next: bool = False) -> None:
        check_cache_namespace("cache_namespace", cache_namespace)
        check_prompt_len("prompt_len", prompt_len, len(context), "len(context_token_ids)")
        if request_id:                  # empty: an anonymous call, drafted without a soft-cache entry to reuse
            check_id("request_id", request_id, MAX_REQUEST_ID_CHARS)
        check_token_ids("context_token_ids", context, self.vocab_size)
        if not 1 <= k <= self.k_max:
            raise ValueError(f"k={k}: must be in [1, {self.k_max}]")
        # A pre-draft's context grows by its guessed token before the K drafts.
        check_fits_context("context_token_ids", len(context) + guess_next, k, self.max_model_len)
        need, total = self._blocks(len(context) + guess_next, k), self.runner.allocator.num_blocks
        if need > total:
            raise KVCacheExhaustedError(
                f"context_token_ids: {len(context)} tokens + K={k} need {need} KV blocks of "
                f"{self.runner.config.block_size} tokens, the draft's whole cache holds {total}")

    def _sequence_for(self, request_id: str, cache_namespace: str = "") -> int:
        # Keyed by tenant too: another tenant's call with the same request id never reuses (or learns of) its KV.
        key = (cache_namespace, request_id)
        if request_id and key in self._seq_of:
            self._seq_of.move_to_end(key)
            return self._seq_of[key]
        seq = self._next_seq
        self._next_seq += 1
        self._seq_of[(cache_namespace, request_id or f"anonymous-{seq}")] = seq
        return seq

    def _evict(self, keep: set[int], limit: int) -> None:
        """Release least recently used sequences (never those in `keep`) until at most `limit` remain."""
        for rid, seq in list(self._seq_of.items()):
            if len(self._seq_of) <= limit:
                break
            if seq not in keep:
                del self._seq_of[rid]
                self.proposer.release(seq)
