"""A small draft model proposes K tokens autoregressively from its own paged KV cache.

The proposer remembers which tokens its KV holds for each sequence; a new round keeps the longest prefix
shared with the committed context (rejected drafts fall away) and feeds only the rest, so rollback needs no
message from the verifier. Sampled rounds draw from q′: the request's temperature / top-k / top-p, with the
support further capped at `max_support` tokens so q′ travels sparsely; any q′ keeps the sampler exact. The
request's penalties apply as on the target (the same function), over the context and the tokens drafted so far,
which keeps the draft close to the penalised target; q′ is what it samples from.

A pre-draft (`guess_next`) first appends the draft's most likely next token (the penalised argmax: the token the
target most likely emits, whatever the temperature) and then drafts as a round from that longer context would,
with the same random streams, so a pre-drafted proposal is the one the round would have drawn.
"""
from __future__ import annotations

import dataclasses

import torch

from common.speculative.penalties import TokenHistory, penalized_logits
from common.speculative.proposal import DraftProposal, SparseDistribution
from common.speculative.proposers import ProposeInput
from common.speculative.sampling import PURPOSE_DRAFT, make_generator, sample_from, truncate_distribution
from common.engine.forward_io import SequenceChunk


def common_prefix_len(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class DraftModelProposer:
    has_model = True

    def __init__(self, runner, max_support: int = 32):
        self.runner = runner                     # a ModelRunner / TPExecutor of the draft model
        self.max_support = max_support
        self._kv_tokens: dict[int, list[int]] = {}

    @property
    def vocab_size(self) -> int:
        return self.runner.model_config.vocab_size

    def propose(self, requests: list[ProposeInput]) -> list[DraftProposal]:
        if not requests:
            return []
        guesses = self._guess([r for r in requests if r.guess_next])
        requests = [dataclasses.replace(r, context=[*r.context, guesses[r.seq_id]], guess_next=False)
                    if r.guess_next else r for r in requests]
        proposals = [DraftProposal([], None if r.params.greedy else [], guessed_token_id=guesses.get(r.seq_id))
                     for r in requests]
        chunks = []
        for r, proposal in zip(requests, proposals):
            proposal.cached_tokens = self._sync(r.seq_id, r.context)
            chunks.append(SequenceChunk(r.seq_id, r.context[proposal.cached_tokens:],
                                        cache_namespace=r.cache_namespace))
        histories = [TokenHistory(r.context, r.prompt_len) if r.params.penalized else None for r in requests]
        active = list(range(len(requests)))
        step = 0
        while active:
            try:
                logits = self.runner.forward(chunks).logits      # one [1, vocab] per active request
            except Exception:
                for r in requests:                               # the cache is soft: forget, never mis-serve
                    self.release(r.seq_id)
                raise
            still, chunks = [], []
            for i, row in zip(active, logits):
                r = requests[i]
                token = self._draw(row[-1:], r, histories[i], step, proposals[i])
                proposals[i].token_ids.append(token)
                if len(proposals[i].token_ids) < r.k:
                    still.append(i)
                    chunks.append(SequenceChunk(r.seq_id, [token]))
                    self._kv_tokens[r.seq_id].append(token)
            active = still
            step += 1
        return proposals

    def _guess(self, requests: list[ProposeInput]) -> dict[int, int]:
        """Each sequence's most likely next token after its context (one batched pass; the KV then holds it)."""
        if not requests:
            return {}
        chunks = [SequenceChunk(r.seq_id, r.context[self._sync(r.seq_id, r.context):],
                                cache_namespace=r.cache_namespace) for r in requests]
        try:
            logits = self.runner.forward(chunks).logits              # one [n, vocab] per request
        except Exception:
            for r in requests:
                self.release(r.seq_id)
            raise
        guesses = {}
        for r, row in zip(requests, logits):
            history = TokenHistory(r.context, r.prompt_len) if r.params.penalized else None
            guesses[r.seq_id] = int(penalized_logits(row[-1:], r.params, history, []).argmax())
        return guesses

    def _sync(self, seq_id: int, context: list[int]) -> int:
        """Roll the draft KV back to its longest prefix shared with `context`; return how many tokens it kept."""
        if not context:
            raise ValueError(f"sequence {seq_id}: empty context")
        cached = self._kv_tokens.get(seq_id, [])
        keep = min(common_prefix_len(cached, context), len(context) - 1)   # feed >= 1 token to get logits
        if seq_id in self._kv_tokens:
            self.runner.truncate(seq_id, keep)
        self._kv_tokens[seq_id] = list(context)
        return keep

    def _draw(self, logits: torch.Tensor, r: ProposeInput, history: TokenHistory | None, step: int,
              proposal: DraftProposal) -> int:
        # logits [1, vocab]; the row follows the context and every token drafted so far
        logits = penalized_logits(logits, r.params, history, proposal.token_ids)
        if r.params.greedy:
            return int(logits.argmax())
        p = r.params
        probs = torch.softmax(logits.float() / p.temperature, dim=-1)                # [1, vocab]
        top_k = min(p.top_k, self.max_support) if p.top_k else self.max_support
        q = truncate_distribution(probs, top_k, p.top_p, p.min_p)[0]      # q′ [vocab]
        position = len(r.context) + step
        token = sample_from(q, make_generator(p.seed, PURPOSE_DRAFT, r.round_index, position))
        proposal.dists.append(SparseDistribution.from_dense(q))
        return token

    def release(self, seq_id: int) -> None:
        if self._kv_tokens.pop(seq_id, None) is not None:
            self.runner.free(seq_id)
