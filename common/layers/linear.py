"""Tensor-parallel linear layers (Megatron style): column-parallel splits outputs, row-parallel inputs."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from common.distributed import TPGroup
from common.layers.batch_invariant import RowTiled
from common.layers.cpu_gemm import packed_linear, prepack
from common.layers.quantization import QuantizedWeight, quantize_shard
from common.layers.weight_utils import copy_into, narrow_cols, narrow_rows, shape_of


def _divide(n: int, d: int, what: str) -> int:
    if n % d:
        raise ValueError(f"{what}={n} is not divisible by tp_size={d}")
    return n // d


class ColumnParallelLinear(RowTiled, nn.Module):
    """y = x Wᵀ with W's output rows split across ranks; each rank returns its slice of y (no communication)."""

    def __init__(self, input_size: int, output_size: int, bias: bool, tp: TPGroup):
        super().__init__()
        self.tp = tp
        self.packed_weight: torch.Tensor | None = None
        self.qweight: QuantizedWeight | None = None
        self.output_size_per_rank = _divide(output_size, tp.world_size, "output_size")
        self.in_features, self.out_features = input_size, self.output_size_per_rank
        self.weight = nn.Parameter(torch.empty(self.output_size_per_rank, input_size), requires_grad=False)
        self.weight.weight_loader = self.weight_loader
        if bias:
            self.bias = nn.Parameter(torch.empty(self.output_size_per_rank), requires_grad=False)
            self.bias.weight_loader = self.weight_loader
        else:
            self.register_parameter("bias", None)

    def weight_loader(self, param: nn.Parameter, loaded, shard_id=None) -> None:
        size = param.shape[0]
        copy_into(param.data, narrow_rows(loaded, self.tp.rank * size, size), "column-parallel shard")

    def quantize(self, method: str, what: str, exact_rows=()) -> None:
        """Switch to a weight-only quantized weight (common/layers/quantization.py) and drop the plain copy."""
        self.qweight = quantize_shard(self.weight.data, method, what, exact_rows)
        self.weight.data = torch.empty(0, dtype=self.weight.dtype)

    def prepack(self) -> None:
        """Switch to a oneDNN-packed weight (CPU) and drop the plain copy."""
        if self.qweight is not None:
            return
        self.packed_weight = prepack(self.weight.data)
        if self.packed_weight is not None:
            self.weight.data = torch.empty(0, dtype=self.weight.dtype)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        if self.qweight is not None:
            return self.qweight.matmul(x, self.bias)
        if self.packed_weight is not None:
            return packed_linear(x, self.packed_weight, self.bias)
        return F.linear(x, self.weight, self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.tiled_matmul(x)


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel projections of the same input fused into one matmul (gate/up, q/k/v).

    Each rank's weight is the concatenation of its slice of every projection, so the fused output splits
    back into per-projection slices locally.
    """

    def __init__(self, input_size: int, output_sizes: list[int], bias: bool, tp: TPGroup):
        self.output_sizes = list(output_sizes)
        super().__init__(input_size, sum(output_sizes), bias, tp)
        self.sizes_per_rank = [_divide(s, tp.world_size, "output_size") for s in self.output_sizes]
        self.weight.shard_ids = tuple(range(len(output_sizes)))
        if self.bias is not None:
            self.bias.shard_ids = self.weight.shard_ids

    def weight_loader(self, param: nn.Parameter, loaded, shard_id=None) -> None:
        if shard_id is None:
            raise ValueError("a merged projection is loaded one shard at a time")
        index = self._shard_index(shard_id)
        offset = sum(self.sizes_per_rank[:index])
        size = self.sizes_per_rank[index]
        full = shape_of(loaded)[0]
        if full != self.output_sizes[index]:
            from common.errors import CheckpointError
            raise CheckpointError(f"projection {shard_id!r} has {full} output rows in the checkpoint, "
                                  f"the model expects {self.output_sizes[index]}")
        copy_into(param.data[offset:offset + size], narrow_rows(loaded, self.tp.rank * size, size),
                  f"projection {shard_id!r}")

    def _shard_index(self, shard_id) -> int:
        return int(shard_id)


class QKVParallelLinear(MergedColumnParallelLinear):
    """Q, K and V projections fused; each rank holds num_heads/tp query heads and num_kv_heads/tp KV heads."""

    def __init__(self, hidden_size: int, head_dim: int, num_heads: int, num_kv_heads: int, bias: bool,
                 tp: TPGroup):
        super().__init__(hidden_size, [num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim],
                         bias, tp)
        self.weight.shard_ids = ("q", "k", "v")
        if self.bias is not None:
            self.bias.shard_ids = ("q", "k", "v")

    def _shard_index(self, shard_id) -> int:
        return "qkv".index(shard_id)


class RowParallelLinear(RowTiled, nn.Module):
    """y = x Wᵀ with W's input columns split across ranks; partial sums are all-reduced (one collective)."""

    def __init__(self, input_size: int, output_size: int, bias: bool, tp: TPGroup):
        super().__init__()
        self.tp = tp
        self.packed_weight: torch.Tensor | None = None
        self.qweight: QuantizedWeight | None = None
        self.input_size_per_rank = _divide(input_size, tp.world_size, "input_size")
        self.in_features, self.out_features = self.input_size_per_rank, output_size
        self.weight = nn.Parameter(torch.empty(output_size, self.input_size_per_rank), requires_grad=False)
        self.weight.weight_loader = self.weight_loader
        if bias:
            # Replicated, added once after the reduction.
            self.bias = nn.Parameter(torch.empty(output_size), requires_grad=False)
        else:
            self.register_parameter("bias", None)

    def weight_loader(self, param: nn.Parameter, loaded, shard_id=None) -> None:
        size = param.shape[1]
        copy_into(param.data, narrow_cols(loaded, self.tp.rank * size, size), "row-parallel shard")

    quantize = ColumnParallelLinear.quantize
    prepack = ColumnParallelLinear.prepack

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        if self.qweight is not None:
            return self.qweight.matmul(x)
        return packed_linear(x, self.packed_weight) if self.packed_weight is not None else F.linear(x, self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.tp.all_reduce(self.tiled_matmul(x))
        return y if self.bias is None else y + self.bias
