"""Sampling parameters of a request: the user's choice, validated once where it enters (torch-free).

The distribution they define over the vocabulary is computed in sampling.py, next to the seeded randomness.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

MAX_TOKENS_LIMIT = 32768
MAX_STOP_STRINGS = 16
MAX_LOGPROBS = 20                 # alternatives per emitted token (OpenAI's top_logprobs limit)
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
    # Part of the target distribution (sampling.py applies them to the logits before temperature; vLLM's
    # definitions): presence/frequency count output tokens, repetition all tokens of prompt and output.
    presence_penalty: float = 0.0     # [-2, 2], 0 = off
    frequency_penalty: float = 0.0    # [-2, 2], 0 = off
    repetition_penalty: float = 1.0   # (0, 2], 1 = off
    logprobs: int | None = None       # alternatives returned per emitted token, [0, MAX_LOGPROBS]; None = no logprobs

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
        for name in ("presence_penalty", "frequency_penalty"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and -2 <= v <= 2):
                raise ValueError(f"{name}={v}: must be in [-2, 2] (0 = off)")
        if not (isinstance(self.repetition_penalty, (int, float)) and 0 < self.repetition_penalty <= 2):
            raise ValueError(f"repetition_penalty={self.repetition_penalty}: must be in (0, 2] (1 = off)")
        if self.logprobs is not None and not (isinstance(self.logprobs, int) and 0 <= self.logprobs <= MAX_LOGPROBS):
            raise ValueError(f"logprobs={self.logprobs}: must be an integer in [0, {MAX_LOGPROBS}] (alternatives per "
                             "token)")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def penalized(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0)
