"""Sampling parameters, the exact distribution they define over the vocabulary, and seeded randomness.

`target_distribution` is *the* distribution a token is drawn from: speculative decoding must reproduce it
exactly, so both the target-only path and the rejection sampler use this one function.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

MAX_TOKENS_LIMIT = 32768
MAX_STOP_STRINGS = 16
# Below this, logits / temperature overflows float32 and the distribution turns into NaN (1e-38 did).
MIN_TEMPERATURE = 1e-5


@dataclass(slots=True)
class SamplingParams:
    temperature: float = 0.0          # 0 = greedy
    top_p: float = 1.0                # nucleus mass in (0, 1]
    top_k: int = 0                    # 0 = off
    min_p: float = 0.0                # in [0, 1): drop tokens below min_p · max prob
    max_tokens: int = 128
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    ignore_eos: bool = False

    def __post_init__(self):
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if not (isinstance(self.temperature, (int, float)) and math.isfinite(self.temperature)
                and (self.temperature == 0 or MIN_TEMPERATURE <= self.temperature <= 100)):
            raise ValueError(f"temperature={self.temperature}: must be 0 (greedy) or a finite number in "
                             f"[{MIN_TEMPERATURE}, 100]")
        if not (isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1):
            raise ValueError(f"top_p={self.top_p}: must be in (0, 1]")
        if not (isinstance(self.top_k, int) and self.top_k >= 0):
            raise ValueError(f"top_k={self.top_k}: must be an integer >= 0 (0 = off)")
        if not (isinstance(self.min_p, (int, float)) and 0 <= self.min_p < 1):
            raise ValueError(f"min_p={self.min_p}: must be in [0, 1)")
        if not (isinstance(self.max_tokens, int) and 1 <= self.max_tokens <= MAX_TOKENS_LIMIT):
            raise ValueError(f"max_tokens={self.max_tokens}: must be in [1, {MAX_TOKENS_LIMIT}]")
        if len(self.stop) > MAX_STOP_STRINGS or any(not s or len(s) > 256 for s in self.stop):
            raise ValueError(f"stop: at most {MAX_STOP_STRINGS} non-empty strings of <= 256 characters")
        if self.seed is not None and not (isinstance(self.seed, int) and 0 <= self.seed < 2**63):
            raise ValueError(f"seed={self.seed}: must be an integer in [0, 2^63)")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def target_distribution(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """logits [n, vocab] -> probabilities [n, vocab] (float32) after temperature, top-k, top-p and min-p."""
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
