"""Presence, frequency and repetition penalties: the first step of the target distribution (sampling.py).

vLLM's definitions, on the raw logits: the repetition penalty r divides a positive logit by r and multiplies
any other by r, for every token seen in the prompt or the output; then logit -= frequency · count and
logit -= presence · (count > 0), counting the output's occurrences only. The history of a row is what comes
before the token it scores: the committed tokens, plus, in a verify chunk, the drafts before that row.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from common.speculative.params import SamplingParams

__all__ = ["TokenHistory", "penalized_logits"]


@dataclass(slots=True)
class TokenHistory:
    """The committed tokens of a sequence (prompt + output so far) and where its prompt ends."""
    tokens: Sequence[int]
    prompt_len: int
    _counts: tuple | None = field(default=None, repr=False, compare=False)

    def __post_init__(self):
        if not 0 <= self.prompt_len <= len(self.tokens):
            raise ValueError(f"prompt_len={self.prompt_len}: must be in [0, {len(self.tokens)}] (the committed "
                             "tokens)")

    def counts(self, vocab_size: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """(output occurrences [vocab] float32, seen in prompt or output [vocab] bool), computed once."""
        if self._counts is None or self._counts[0].shape[0] != vocab_size or self._counts[0].device != device:
            ids = torch.tensor(list(self.tokens), dtype=torch.long, device=device)
            output = torch.bincount(ids[self.prompt_len:], minlength=vocab_size).float()
            seen = torch.bincount(ids, minlength=vocab_size) > 0
            self._counts = (output, seen)
        return self._counts


def penalized_logits(logits: torch.Tensor, params: SamplingParams, history: TokenHistory | None,
                     drafts: Sequence[int] = ()) -> torch.Tensor:
    """logits [n, vocab] -> the penalised logits [n, vocab]; the same tensor when the params set no penalty.

    The last row scores the token after every draft, each row before it one draft fewer: with K drafts and
    K+1 rows (a verify chunk), row i follows d_1..d_i; with one row (a draft step), it follows all of them.
    """
    if not params.penalized:
        return logits
    if history is None:
        raise ValueError("penalties need the sequence's token history")
    n, vocab = logits.shape
    if n > len(drafts) + 1:
        raise ValueError(f"{n} rows of logits need at least {n - 1} drafts before them, got {len(drafts)}")
    m, dev = len(drafts), logits.device
    output, seen = history.counts(vocab, dev)                                        # [vocab], [vocab]
    before_all, stepped = list(drafts)[:m - n + 1], list(drafts)[m - n + 1:]        # n - 1 stepped drafts
    counts = output
    if before_all:                                   # a draft step's own earlier tokens: every row follows them
        counts = counts + torch.bincount(torch.tensor(before_all, dtype=torch.long, device=dev),
                                         minlength=vocab).float()
    counts = counts.expand(n, vocab)                                                 # [n, vocab]
    if stepped:                                      # row i of a verify chunk also follows d_1..d_i
        onehot = torch.zeros(n, vocab, device=dev)
        onehot[torch.arange(1, n, device=dev), torch.tensor(stepped, dtype=torch.long, device=dev)] = 1.0
        counts = counts + onehot.cumsum(0)
    z = logits.float()
    if params.repetition_penalty != 1.0:
        r = params.repetition_penalty
        z = torch.where(seen | (counts > 0), torch.where(z > 0, z / r, z * r), z)
    if params.frequency_penalty:
        z = z - params.frequency_penalty * counts
    if params.presence_penalty:
        z = z - params.presence_penalty * (counts > 0).float()
    return z
