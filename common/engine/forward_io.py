"""What a forward pass takes (one SequenceChunk per sequence) and what it returns (ForwardOutput)."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(slots=True)
class SequenceChunk:
    """New tokens for one sequence in one forward pass, and how many trailing positions need logits.

    Prefill: all prompt tokens, num_logits=1. Decode: one token, num_logits=1. Verify: the last committed
    token(s) + K drafts, num_logits=K+1. A sequence's first chunk starts it.
    """
    seq_id: int
    token_ids: list[int]
    num_logits: int = 1
    cache_namespace: str = ""      # prefix-cache tenant of a new sequence ("" = shared); later chunks: ignored

    def __post_init__(self):
        if not self.token_ids:
            raise ValueError(f"sequence {self.seq_id}: a chunk needs at least one token")
        if not 1 <= self.num_logits <= len(self.token_ids):
            raise ValueError(f"sequence {self.seq_id}: num_logits={self.num_logits} must be in "
                             f"[1, {len(self.token_ids)}]")


@dataclass(slots=True)
class ForwardOutput:
    """One entry per chunk, in the order of the chunks passed to `forward`."""
    logits: list[torch.Tensor]     # per chunk: [num_logits_i, vocab] float32
    cached_tokens: list[int]       # per chunk: leading tokens loaded from the prefix cache instead of computed
