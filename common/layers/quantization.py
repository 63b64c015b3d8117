"""Weight-only quantization of matmul weights: int8 per output channel, int4 in groups of 32 with zero points.

Decoding is memory-bound: each token reads every weight once, so bytes per weight set the speed. Activations stay
in the model's dtype (bf16 or fp32); only the weights shrink, and the kernels dequantize as they go. The kernels
are PyTorch's own CPU kernels, chosen by measurement (bench/kernels.py prints their cost for 1..9 rows):

- int8: `torch._weight_int8pack_mm(x, q [N, K] int8, scales [N])`, y = x · (q · scale)ᵀ, symmetric per row of W.
- int4: `torch._weight_int4pack_mm_for_cpu(x, packed, group, scales_and_zeros [K/group, N, 2])`, where each
  weight is w = (q − 8) · scale + zero with q in 0..15 (asymmetric: zero = min + 8 · scale).

A group of 32 input columns is the unit GGUF's K-quants use too (Q4_K: 8 sub-blocks of 32 per 256), so a Q4_K
tensor's own 4-bit codes load into this layout as they are (common/models/gguf_weights.py); only its per-group
scale and offset are rounded to the activation dtype, the kernel's scale dtype.

Each tensor-parallel rank quantizes its own shard after loading it: a column-parallel shard splits output rows, a
row-parallel shard input columns, and `check_shard` makes sure groups never straddle two ranks.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from common.errors import ConfigError

METHODS = ("none", "int8", "int4")
INT4_GROUP = 32                     # input columns per int4 scale/zero pair
INT4_N_MULTIPLE = 16                # the CPU int4 packing wants output rows in multiples of 16


def check_method(method: str, field_name: str = "quantization") -> None:
    if method not in METHODS:
        raise ConfigError(f"{field_name}={method!r}: must be one of {', '.join(METHODS)}")


def check_shard(method: str, out_features: int, in_features: int, what: str) -> None:
    """Raise ConfigError when a [out, in] weight shard cannot be quantized with `method` (it names the limit)."""
    if method == "int4":
        if in_features % INT4_GROUP:
            raise ConfigError(f"quantization=int4: {what} has {in_features} input columns per rank, not a "
                              f"multiple of the group size {INT4_GROUP} (a group would straddle two shards); "
                              "use int8 or another tp_size")
        if out_features % INT4_N_MULTIPLE:
            raise ConfigError(f"quantization=int4: {what} has {out_features} output rows per rank, not a "
                              f"multiple of {INT4_N_MULTIPLE} (the CPU int4 packing); use int8 or another tp_size")


class QuantizedWeight:
    """A [out, in] weight in a packed integer layout; `matmul(x [n, in]) -> [n, out]` in x's dtype."""
    method: str
    out_features: int
    in_features: int

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @property
    def nbytes(self) -> int:
        raise NotImplementedError


@dataclass(eq=False)
class Int8Weight(QuantizedWeight):
    q: torch.Tensor                 # [out, in] int8
    scales: torch.Tensor            # [out], activation dtype
    method = "int8"

    @property
    def out_features(self) -> int:
        return self.q.shape[0]

    @property
    def in_features(self) -> int:
        return self.q.shape[1]

    def matmul(self, x: torch.Tensor) -> torch.Tensor:  # x [n, in] -> [n, out]
        return torch._weight_int8pack_mm(x, self.q, self.scales)

    @property
    def nbytes(self) -> int:
        return self.q.nbytes + self.scales.nbytes


@dataclass(eq=False)
class Int4Weight(QuantizedWeight):
    packed: torch.Tensor            # [out, in / 2] uint8, the CPU kernel's packing
    scales_and_zeros: torch.Tensor  # [in / group, out, 2], activation dtype
    out_features: int
    in_features: int
    group: int = INT4_GROUP
    method = "int4"

    def matmul(self, x: torch.Tensor) -> torch.Tensor:  # x [n, in] -> [n, out]
        return torch._weight_int4pack_mm_for_cpu(x, self.packed, self.group, self.scales_and_zeros)

    @property
    def nbytes(self) -> int:
        return self.packed.nbytes + self.scales_and_zeros.nbytes


def quantize_int8(weight: torch.Tensor) -> Int8Weight:
    """Symmetric per-output-row int8: scale = max |w| / 127 over the row."""
    w = weight.float()                                                   # [out, in]
    scales = _rounded((w.abs().amax(dim=1) / 127).clamp(min=_TINY), weight.dtype)   # as the kernel will see them
    q = torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8)
    return Int8Weight(q, scales.to(weight.dtype))


def quantize_int4(weight: torch.Tensor, group: int = INT4_GROUP, exact_rows=()) -> Int4Weight:
    """Asymmetric int4 per group of `group` input columns: the group's [min, max] spread over codes 0..15.
    `exact_rows`: row ranges whose codes are given already (each with .row_start, .codes, .scale, .offset: a GGUF's
    own Q4_K blocks), used as they are instead of quantizing those rows again."""
    codes, scale, offset = int4_codes(weight, group)
    for part in exact_rows:
        rows = slice(part.row_start, part.row_start + part.codes.shape[0])
        codes[rows], scale[rows], offset[rows] = part.codes, part.scale, part.offset
    return int4_from_codes(codes, scale, offset, weight.dtype, group)


def int4_codes(weight: torch.Tensor, group: int = INT4_GROUP) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """weight [out, in] -> codes [out, in] int32 in 0..15, and scale, offset [out, in / group] float32 such that
    w ≈ codes · scale + offset, with scale and zero already rounded to the weight's dtype (the kernel's)."""
    out_features, in_features = weight.shape
    w = weight.float().reshape(out_features, in_features // group, group)   # [out, groups, group]
    lo, hi = w.amin(dim=-1), w.amax(dim=-1)                                  # [out, groups]
    scale = _rounded(((hi - lo) / 15).clamp(min=_TINY), weight.dtype)       # as the kernel will see them
    zero = _rounded(lo + 8 * scale, weight.dtype)
    codes = torch.round((w - zero[..., None]) / scale[..., None] + 8).clamp(0, 15)
    return codes.reshape(out_features, in_features).to(torch.int32), scale, zero - 8 * scale


_TINY = 2.0 ** -100                 # a floor for the scale of an all-equal row or group (bf16 and fp32 hold it)


def _rounded(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t.to(dtype).float()


def int4_from_codes(codes: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, dtype: torch.dtype,
                    group: int = INT4_GROUP) -> Int4Weight:
    """Pack w = codes · scale + offset (codes [out, in] in 0..15; scale, offset [out, in / group], float32)."""
    out_features, in_features = codes.shape
    zero = offset + 8 * scale                                     # the kernel's form: (q - 8) · scale + zero
    scales_and_zeros = torch.stack([scale, zero], dim=-1).transpose(0, 1).contiguous().to(dtype)  # [groups, out, 2]
    packed = torch._convert_weight_to_int4pack_for_cpu(codes.contiguous(), 1)
    return Int4Weight(packed, scales_and_zeros, out_features, in_features, group)


def quantize_shard(weight: torch.Tensor, method: str, what: str, exact_rows=()) -> QuantizedWeight:
    """This rank's [out, in] shard quantized with `method`; ConfigError naming `what` when its shape cannot be.
    `exact_rows`: int4 rows whose codes are given (see quantize_int4)."""
    check_shard(method, weight.shape[0], weight.shape[1], what)
    if exact_rows:
        if method != "int4":
            raise ConfigError(f"{what}: exact rows are int4 codes, the layer is quantized with {method}")
        return quantize_int4(weight, exact_rows=exact_rows)
    return quantize(weight, method)


def quantize(weight: torch.Tensor, method: str) -> QuantizedWeight:
    if weight.device.type != "cpu":
        raise ConfigError(f"quantization={method}: the quantized kernels are measured on CPU only, "
                          f"not on device={weight.device.type!r}")
    if method == "int8":
        return quantize_int8(weight)
    if method == "int4":
        return quantize_int4(weight)
    raise ConfigError(f"quantization={method!r}: nothing to quantize with (one of int8, int4)")


def dequantize(qw: QuantizedWeight) -> torch.Tensor:
    """The float32 [out, in] weight the kernel computes with (for tests and quality reports)."""
    if isinstance(qw, Int8Weight):
        return qw.q.float() * qw.scales.float()[:, None]
    sz = qw.scales_and_zeros.float()                              # [groups, out, 2]
    probe = Int4Weight(qw.packed, sz, qw.out_features, qw.in_features, qw.group)
    return probe.matmul(torch.eye(qw.in_features)).T.contiguous()  # [out, in]: the kernel applied to one-hot rows
