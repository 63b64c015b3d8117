"""The exact distribution sampling parameters define over the vocabulary, and seeded randomness.

`target_distribution` is *the* distribution a token is drawn from: speculative decoding must reproduce it
exactly, so both the target-only path and the rejection sampler use this one function. Its first step, the
penalties for each row's history, is `penalized_logits` (penalties.py); greedy is the argmax of those.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from common.speculative.params import SamplingParams
from common.speculative.penalties import TokenHistory, penalized_logits

__all__ = ["target_distribution", "truncate_distribution", "make_generator", "sample_from",
           "uniform", "stream_seed"]


def target_distribution(logits: torch.Tensor, params: SamplingParams, history: TokenHistory | None = None,
                        drafts: Sequence[int] = ()) -> torch.Tensor:
    """raw logits [n, vocab] -> probabilities [n, vocab] (float32) after the penalties (row i's history:
    `history` + the drafts before it, see penalized_logits), temperature, top-k, top-p and min-p."""
    logits = penalized_logits(logits, params, history, drafts)
    if params.greedy:
        probs = torch.zeros_like(logits, dtype=torch.float32)
        probs.scatter_(-1, logits.argmax(-1, keepdim=True), 1.0)
        return probs
    probs = torch.softmax(logits.float() / params.temperature, dim=-1)
    return truncate_distribution(probs, params.top_k, params.top_p, params.min_p)


def truncate_distribution(probs: torch.Tensor, top_k: int = 0, top_p: float = 1.0,
                          min_p: float = 0.0) -> torch.Tensor:
    """Keep the top-k / nucleus-p / min-p support of each row and renormalise. probs [n, vocab]."""
    if top_k == 0 and top_p >= 1.0 and min_p == 0.0:
        return probs
    keep = torch.ones_like(probs, dtype=torch.bool)
    if top_k:
        kth = probs.topk(min(top_k, probs.shape[-1]), dim=-1).values[..., -1:]   # [n, 1]
        keep &= probs >= kth
    if top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        # a token stays if the mass strictly before it is < top_p (the most likely token always stays)
        before = sorted_p.cumsum(-1) - sorted_p
        keep_sorted = before < top_p
        keep &= torch.zeros_like(keep).scatter(-1, order, keep_sorted)
    if min_p > 0:
        keep &= probs >= min_p * probs.max(-1, keepdim=True).values
    out = probs * keep
    return out / out.sum(-1, keepdim=True)


# ---- seeded randomness: one independent stream per (request seed, purpose, round, position) -----------------
_MASK64 = (1 << 64) - 1


def _mix(x: int) -> int:
    """splitmix64 finaliser: decorrelates nearby integers."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


PURPOSE_DRAFT, PURPOSE_ACCEPT, PURPOSE_RESAMPLE = 1, 2, 3


def stream_seed(seed: int, purpose: int, round_index: int, position: int) -> int:
    h = _mix(seed)
    for part in (purpose, round_index, position):
        h = _mix(h ^ part)
    return h & ((1 << 63) - 1)


def make_generator(seed: int | None, purpose: int, round_index: int, position: int,
                   device: str | torch.device = "cpu") -> torch.Generator | None:
    if seed is None:
        return None
    g = torch.Generator(device=device)
    g.manual_seed(stream_seed(seed, purpose, round_index, position))
    return g


def sample_from(probs: torch.Tensor, generator: torch.Generator | None) -> int:
    """Draw one token id from a probability row [vocab]."""
    return int(torch.multinomial(probs, 1, generator=generator))


def uniform(generator: torch.Generator | None) -> float:
    return float(torch.rand((), generator=generator))
