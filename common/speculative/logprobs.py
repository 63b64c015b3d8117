"""The log-probabilities reported for emitted tokens: the target's, at every position, accepted drafts included.

Definition: log_softmax of the target's *penalised* logits (penalties.py) at temperature 1, over the whole
vocabulary: no temperature, top-k, top-p or min-p. With no penalty set these are the model's raw logprobs
(vLLM's default `raw_logprobs`); they never depend on the draft, on K, or on whether a token was accepted,
recovered or a bonus, so speculative and target-only decoding report the same numbers. Only the verifier's
rejection sampler and the in-process one (the same code) compute them, from the rows they already hold.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from common.speculative.outcome import TokenLogprob
from common.speculative.params import SamplingParams
from common.speculative.penalties import TokenHistory, penalized_logits

__all__ = ["token_logprobs"]


def token_logprobs(logits: torch.Tensor, params: SamplingParams, history: TokenHistory | None,
                   emitted: Sequence[int]) -> list[TokenLogprob]:
    """logits [K+1, vocab]: a verify chunk's raw target rows; emitted e_0..e_n (n accepted drafts, then the
    recovered/bonus token). Row i scores e_i after the committed tokens and e_0..e_{i-1} (= d_1..d_i)."""
    n = len(emitted)
    z = penalized_logits(logits[:n], params, history, emitted[:n - 1])             # [n, vocab]
    lp = torch.log_softmax(z.float(), dim=-1)                                      # [n, vocab]
    ids = torch.tensor(list(emitted), dtype=torch.long, device=lp.device)
    chosen = lp.gather(-1, ids.unsqueeze(-1)).squeeze(-1).tolist()                 # [n]
    top_n = min(params.logprobs or 0, lp.shape[-1])
    if top_n:
        top = lp.topk(top_n, dim=-1)                                               # sorted: most likely first
        top_ids, top_lps = top.indices.tolist(), top.values.tolist()
    else:
        top_ids = top_lps = [[] for _ in range(n)]
    return [TokenLogprob(int(t), float(c), list(zip(i, v)))
            for t, c, i, v in zip(emitted, chosen, top_ids, top_lps)]
