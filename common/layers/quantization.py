"""Weight-only quantization of matmul weights: int8 and int4, each on the kernel this processor runs best.

Decoding is memory-bound: each token reads every weight once, so bytes per weight set the speed. Norms, the KV
cache, attention and the sampler stay in the model's dtype; only the matmul weights shrink. Two kernels, chosen
per processor (`kernel_of`), each with its own layout:

- **vnni** (AVX-512 VNNI, or AVX2 where the processor lacks AVX-512, the same numbers either way:
  common/kernels/vnni_gemm.py, our own): int4 = Q4_K's form, w = d·sc·q − dmin·mn per
  group of 32 input columns (8-bit sc, mn; float16 d, dmin per super-block of 256 columns); int8 the same form with byte
  codes. Activations are quantized to int8 per row and group of 32, as llama.cpp does, and the integer dot
  products run on `vpdpbusd` (AVX2: `vpmaddubsw`): a 1-row pass reads the weights at memory speed and a 5-row verify pass costs little
  more (bench-kernels). A GGUF's Q4_K tensors load into it exactly, codes and scales.
- **torch** (every other CPU): PyTorch's weight-only kernels with activations in the model's dtype. int8:
  `torch._weight_int8pack_mm(x, q [N, K] int8, scales [N])`, symmetric per row. int4:
  `torch._weight_int4pack_mm_for_cpu` with w = (q − 8)·scale + zero per group of 32, scale and zero in the
  activation dtype (a Q4_K tensor's codes load exactly, its scales round to that dtype).

The two compute different numbers, so the kernel is part of the numerics (`numerics_of`): the prefix cache's
root and a multi-node group's terms include it.

Each tensor-parallel rank quantizes its own shard after loading it: a column-parallel shard splits output rows, a
row-parallel shard input columns, and `check_shard` makes sure groups never straddle two ranks.
"""
from __future__ import annotations

import abc
import functools
import logging
import os
from dataclasses import dataclass

import torch

from common.errors import ConfigError
from common.kernels import vnni_gemm

log = logging.getLogger(__name__)

METHODS = ("none", "int8", "int4")
KERNELS = ("vnni", "torch")
INT4_GROUP = 32                     # input columns per int4 scale/zero pair
INT4_N_MULTIPLE = 16                # the CPU int4 packing wants output rows in multiples of 16


def check_method(method: str, field_name: str = "quantization") -> None:
    if method not in METHODS:
        raise ConfigError(f"{field_name}={method!r}: must be one of {', '.join(METHODS)}")


KERNEL_ENV = "SPECD_QUANT_KERNEL"   # vnni | torch: pin the kernel (spawned ranks and services inherit it)


def kernel_of(method: str) -> str:
    """The kernel `method` runs on in this process: vnni where the processor and the build allow it, else torch;
    $SPECD_QUANT_KERNEL pins one (ConfigError when it names one this process cannot run)."""
    if method == "none":
        return "none"
    pinned = os.environ.get(KERNEL_ENV, "").strip()
    if pinned:
        if pinned not in KERNELS:
            raise ConfigError(f"{KERNEL_ENV}={pinned!r}: must be one of {', '.join(KERNELS)}")
        if pinned == "vnni" and not vnni_gemm.available():
            raise ConfigError(f"{KERNEL_ENV}=vnni: {vnni_gemm.unavailable_reason()}")
        return pinned
    if not vnni_gemm.available():
        _log_fallback_once(vnni_gemm.unavailable_reason())
        return "torch"
    return "vnni"


@functools.lru_cache(maxsize=1)
def _log_fallback_once(reason: str) -> None:
    log.warning("quantized matmuls use PyTorch's kernels: the VNNI kernel is unavailable (%s)", reason)


def numerics_of(method: str) -> str:
    """The quantization as the numbers see it: the method and its kernel (`int4/vnni`), or `none`."""
    return method if method == "none" else f"{method}/{kernel_of(method)}"


def check_shard(method: str, out_features: int, in_features: int, what: str) -> None:
    """Raise ConfigError when a [out, in] weight shard cannot be quantized with `method` (it names the limit)."""
    if method != "none" and kernel_of(method) == "vnni":
        if in_features % vnni_gemm.GROUP:
            raise ConfigError(f"quantization={method}: {what} has {in_features} input columns per rank, not a "
                              f"multiple of the group size {vnni_gemm.GROUP} (a group would straddle two shards); "
                              "use another tp_size")
        if out_features % vnni_gemm.TILE:
            raise ConfigError(f"quantization={method}: {what} has {out_features} output rows per rank, not a "
                              f"multiple of {vnni_gemm.TILE} (the VNNI kernel's tile); use another tp_size")
        return
    if method == "int4":
        if in_features % INT4_GROUP:
            raise ConfigError(f"quantization=int4: {what} has {in_features} input columns per rank, not a "
                              f"multiple of the group size {INT4_GROUP} (a group would straddle two shards); "
                              "use int8 or another tp_size")
        if out_features % INT4_N_MULTIPLE:
            raise ConfigError(f"quantization=int4: {what} has {out_features} output rows per rank, not a "
                              f"multiple of {INT4_N_MULTIPLE} (the CPU int4 packing); use int8 or another tp_size")


class QuantizedWeight(abc.ABC):
    """A [out, in] weight in a packed integer layout; `matmul(x [n, in]) -> [n, out]` in x's dtype."""
    method: str
    out_features: int
    in_features: int

    def matmul(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """x [n, in] -> x Wᵀ (+ bias) [n, out] in x's dtype."""
        raise NotImplementedError

    @property
    def nbytes(self) -> int:
        raise NotImplementedError


QuantizedWeight.register(vnni_gemm.VnniWeight)


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

    def matmul(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:  # [n, in] -> [n, out]
        y = torch._weight_int8pack_mm(x, self.q, self.scales)
        return y if bias is None else y + bias

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

    def matmul(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:  # [n, in] -> [n, out]
        y = torch._weight_int4pack_mm_for_cpu(x, self.packed, self.group, self.scales_and_zeros)
        return y if bias is None else y + bias

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
    if exact_rows and method != "int4":
        raise ConfigError(f"{what}: exact rows are int4 codes, the layer is quantized with {method}")
    return quantize(weight, method, exact_rows)


def quantize(weight: torch.Tensor, method: str, exact_rows=(), kernel: str | None = None) -> QuantizedWeight:
    """`kernel`: vnni or torch; by default the one this processor runs (`kernel_of`)."""
    if weight.device.type != "cpu":
        raise ConfigError(f"quantization={method}: the quantized kernels are measured on CPU only, "
                          f"not on device={weight.device.type!r}")
    if method not in ("int8", "int4"):
        raise ConfigError(f"quantization={method!r}: nothing to quantize with (one of int8, int4)")
    kernel = kernel or kernel_of(method)
    if kernel not in KERNELS:
        raise ConfigError(f"kernel={kernel!r}: must be one of {', '.join(KERNELS)}")
    if kernel == "vnni":
        if not vnni_gemm.available():
            raise ConfigError(f"kernel=vnni: {vnni_gemm.unavailable_reason()}")
        return quantize_vnni(weight, 4 if method == "int4" else 8, exact_rows)
    if method == "int8":
        return quantize_int8(weight)
    return quantize_int4(weight, exact_rows=exact_rows)


def quantize_vnni(weight: torch.Tensor, bits: int, exact_rows=()) -> vnni_gemm.VnniWeight:
    """The VNNI kernel's layout; `exact_rows` (4 bits) replace those rows' codes and scales with given ones."""
    gc = vnni_gemm.quantize_groups(weight, bits)
    for part in exact_rows:
        rows = slice(part.row_start, part.row_start + part.groups.codes.shape[0])
        for field in ("codes", "sc", "mn", "d", "dmin"):
            getattr(gc, field)[rows] = getattr(part.groups, field)
    vnni_gemm.check_superblocks(gc, "quantize_vnni")
    return vnni_gemm.pack(gc)


def dequantize(qw: QuantizedWeight) -> torch.Tensor:
    """The float32 [out, in] weight the kernel computes with (for tests and quality reports)."""
    if isinstance(qw, vnni_gemm.VnniWeight):
        return vnni_gemm.unpack(qw).dequantized()
    if isinstance(qw, Int8Weight):
        return qw.q.float() * qw.scales.float()[:, None]
    sz = qw.scales_and_zeros.float()                              # [groups, out, 2]
    probe = Int4Weight(qw.packed, sz, qw.out_features, qw.in_features, qw.group)
    return probe.matmul(torch.eye(qw.in_features)).T.contiguous()  # [out, in]: the kernel applied to one-hot rows
