"""RMSNorm, computed in float32 like the reference implementations; optionally with the residual add folded in."""
from __future__ import annotations

import torch
from torch import nn

from common.kernels import layer_ops


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(size), requires_grad=False)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """x [..., size] -> norm(x); with residual: (norm(x + residual), x + residual). On CPU the sum is written
        into `residual` (common/kernels/layer_ops.py); callers hand over a residual they no longer read."""
        if layer_ops.runs(x) and x.is_contiguous() and x.dtype == self.weight.dtype and \
                (residual is None or residual.is_contiguous()):
            flat = x.view(-1, x.shape[-1])
            if residual is None:
                return layer_ops.rms_norm(flat, self.weight, self.eps).view(x.shape)
            return layer_ops.rms_norm(flat, self.weight, self.eps, residual.view(flat.shape)).view(x.shape), residual
        if residual is None:
            return self._norm(x)
        residual = residual + x
        return self._norm(residual), residual

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)
