"""Vocabulary-parallel embedding and LM head: each rank owns a contiguous slice of the vocabulary."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from common.distributed import TPGroup
from common.layers.batch_invariant import RowTiled
from common.layers.cpu_gemm import packed_linear, prepack
from common.layers.quantization import QuantizedWeight, quantize_shard
from common.layers.weight_utils import copy_into, narrow_rows, shape_of
from common.errors import CheckpointError


class VocabParallelEmbedding(nn.Module):
    """Rows [rank·P, (rank+1)·P) of the table live on this rank (P = ceil(vocab/tp), the last slice zero-padded)."""

    def __init__(self, vocab_size: int, hidden_size: int, tp: TPGroup):
        super().__init__()
        self.tp = tp
        self.vocab_size = vocab_size
        self.rows_per_rank = -(-vocab_size // tp.world_size)
        self.vocab_start = tp.rank * self.rows_per_rank
        self.vocab_end = min(self.vocab_start + self.rows_per_rank, vocab_size)
        self.weight = nn.Parameter(torch.empty(self.rows_per_rank, hidden_size), requires_grad=False)
        self.weight.data[self.vocab_end - self.vocab_start:].zero_()   # padding rows of the last slice
        self.weight.weight_loader = self.weight_loader

    def weight_loader(self, param: nn.Parameter, loaded, shard_id=None) -> None:
        rows = shape_of(loaded)[0]
        if rows != self.vocab_size:
            raise CheckpointError(f"embedding has {rows} rows in the checkpoint, config vocab_size={self.vocab_size}")
        n = self.vocab_end - self.vocab_start
        copy_into(param.data[:n], narrow_rows(loaded, self.vocab_start, n), "vocab-parallel shard")

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:  # [num_tokens] -> [num_tokens, hidden]
        if self.tp.world_size == 1:
            return F.embedding(input_ids, self.weight)
        in_range = (input_ids >= self.vocab_start) & (input_ids < self.vocab_end)
        local_ids = (input_ids - self.vocab_start) * in_range
        y = F.embedding(local_ids, self.weight) * in_range.unsqueeze(-1).to(self.weight.dtype)
        return self.tp.all_reduce(y)


class ParallelLMHead(RowTiled, VocabParallelEmbedding):
    """logits = h Eᵀ over this rank's vocabulary slice, gathered into the full vocabulary on every rank."""

    packed_weight: torch.Tensor | None = None
    qweight: QuantizedWeight | None = None

    def __init__(self, vocab_size: int, hidden_size: int, tp: TPGroup):
        super().__init__(vocab_size, hidden_size, tp)
        self.in_features, self.out_features = hidden_size, self.rows_per_rank

    # Both keep the plain weight: a tied head shares it with the embedding lookup (the model drops an untied one).
    def quantize(self, method: str, what: str, exact_rows=()) -> None:
        self.qweight = quantize_shard(self.weight.data, method, what, exact_rows)

    def prepack(self) -> None:
        if self.qweight is None:
            self.packed_weight = prepack(self.weight.data)

    def matmul(self, hidden: torch.Tensor) -> torch.Tensor:  # [n, hidden] -> [n, rows_per_rank]
        if self.qweight is not None:
            return self.qweight.matmul(hidden)
        if self.packed_weight is not None:
            return packed_linear(hidden, self.packed_weight)
        return F.linear(hidden, self.weight)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:  # [n, hidden] -> [n, vocab]
        logits = self.tiled_matmul(hidden)                      # [n, rows_per_rank]
        if self.tp.world_size > 1:
            logits = self.tp.all_gather_last_dim(logits)        # [n, rows_per_rank * tp]
        return logits[:, :self.vocab_size]
