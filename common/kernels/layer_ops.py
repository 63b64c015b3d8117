"""A decoder layer's small operations in one pass each (`layer_ops.cpp`): RMSNorm with the residual add folded
in, RoPE in place with the K/V cache write, and the SiLU-gated product.

Why: at decode a layer's activations are one row of a few thousand numbers, and the PyTorch chains these replace
(~9 ops per RMSNorm, ~14 for RoPE, the index_put of the cache write, 3 for the MLP gate) cost their calls, not
their arithmetic: ~10 ms of a 1.5B int4 decode step on 2 cores, against ~32 ms of matmuls. The kernels compute
torch's numbers (fp32 arithmetic, bf16 intermediates rounded where torch rounds them); only the RMSNorm sum's
order and SiLU's exp can differ in the last bit of an fp32. Rows are computed alone: batch-invariant.

`runs(x)` says whether they serve a tensor like `x` here (CPU, fp32 or bf16, AVX-512 or AVX2 (the same bits), the
build works);
$SPECD_LAYER_OPS=torch keeps PyTorch's ops (A/B measurements). The layers fall back to PyTorch's ops elsewhere.
"""
from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path

import torch

from common.kernels.build import load_extension, status_line

SOURCE = Path(__file__).with_name("layer_ops.cpp")
ENV = "SPECD_LAYER_OPS"             # "torch": PyTorch's ops even where these kernels run


def _extension():
    return load_extension("specd_layer_ops", SOURCE, "avx2")


def available() -> bool:
    return _extension()[0] is not None


def unavailable_reason() -> str | None:
    return _extension()[1]


def isa() -> str | None:
    """The instruction path calls take here: "avx512" or "avx2" (None: the kernel does not run)."""
    module = _extension()[0]
    return module.isa() if module is not None else None


def force_avx2(on: bool) -> None:
    """Pin the AVX2 path on a processor that also has AVX-512 (tests compare the two paths' bits)."""
    _extension()[0].force_avx2(on)


@lru_cache(maxsize=1)
def enabled() -> bool:
    """Whether this process uses the kernels where they run (not pinned off by $SPECD_LAYER_OPS=torch, read once:
    the layers ask on every call)."""
    return os.environ.get(ENV, "").strip() != "torch" and available()


def runs(x: torch.Tensor) -> bool:
    return x.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16) and enabled()


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None) -> torch.Tensor:
    """x [T, N] -> RMSNorm [T, N]; with residual [T, N]: residual += x in place, and the norm is of the sum."""
    return _extension()[0].rms_norm(x, weight, eps, residual)


def rope_store_kv(qkv: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, num_heads: int,
                  num_kv_heads: int, head_dim: int, k_cache: torch.Tensor, v_cache: torch.Tensor,
                  slots: torch.Tensor) -> None:
    """qkv [T, (H + 2·KVH)·D] in place: RoPE on q and k at positions [T] (cos, sin [P, D/2]); then token t's k and v
    into slot slots[t] of k_cache, v_cache [S, KVH, D]."""
    _extension()[0].rope_store_kv(qkv, positions, cos, sin, num_heads, num_kv_heads, head_dim, k_cache, v_cache,
                                  slots)


def silu_mul(x: torch.Tensor) -> torch.Tensor:
    """x [T, 2·I] = [gate | up] -> silu(gate) · up [T, I]."""
    return _extension()[0].silu_mul(x)


if __name__ == "__main__":
    print(status_line(SOURCE, _extension()))
