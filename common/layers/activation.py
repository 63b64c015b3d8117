"""SiLU-gated MLP activation over a fused [gate | up] projection."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from common.kernels import layer_ops


class SiluAndMul(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [n, 2·d] -> [n, d]
        if layer_ops.runs(x) and x.dim() == 2 and x.is_contiguous():
            return layer_ops.silu_mul(x)
        gate, up = x.chunk(2, dim=-1)
        return F.silu(gate) * up
