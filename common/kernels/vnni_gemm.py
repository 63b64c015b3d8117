"""4- and 8-bit weights times 8-bit activations (`vnni_gemm.cpp`): the CPU decode matmul, on AVX-512 VNNI or AVX2.

Why our own kernel: decoding reads every weight once per token, and a verify pass reads them once for K+1 rows.
PyTorch's int4 CPU kernel (`_weight_int4pack_mm_for_cpu`) dequantizes to floats and reaches ~60% of the memory
bandwidth for one row, and a 5-row pass costs ~3x a 1-row one (bench-kernels): verification is not cheap. This
kernel does what llama.cpp does: activations are quantized to int8 per row and group of 32 (Q8_0's blocks), and VNNI's
`vpdpbusd` multiplies 64 weight codes by 64 activation bytes in one instruction, so the unpacked weights of a
group serve every row of the pass. A processor without AVX-512 (AMD Zen 2/3, older Intel) runs the same layout on
AVX2: `vpmaddubsw` + `vpmaddwd` in place of `vpdpbusd`, half a tile (8 rows) per vector; the two paths compute the
same integer sums and the same float operations in the same order, so they give the same bits and the kernel's
numerics (`int4/vnni`) do not depend on which one runs. Integer sums are exact, and every output row is computed by one thread over
the whole of K in a fixed order, so a row's result does not depend on the rows beside it (batch-invariant without
padding).

Format (per output row, per group of 32 input columns, Q4_K's): w = d·sc·q − dmin·mn, q in 0..2^bits − 1, `sc`
and `mn` 8-bit integers per group, `d` and `dmin` float16 per super-block of G groups (G = 8, i.e. 256 columns,
where K allows; else 4, 2 or 1). A Q4_K tensor's blocks (6-bit sc/mn, fp16 d/dmin per 256) are exactly this form.
Bytes per weight: 4 bits + 2·8/32 + 2·16/(32·G) = 4.625 at G = 8 (Q4_K: 4.5); 8 bits: 8.625.

The extension is built on first use with the machine's compiler into torch's extension cache (~30 s once);
`available()` says whether this process can run it and `unavailable_reason()` why not (no AVX2, no compiler);
`isa()` which path runs. `python -m common.kernels.vnni_gemm` builds it ahead of time and says which.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from common.kernels.build import load_extension, status_line

GROUP = 32                       # input columns per sub-scale
TILE = 16                        # output rows per VNNI operand (one 32-bit lane each)
SUPERBLOCK_GROUPS = (8, 4, 2, 1) # groups per fp16 scale, largest first
MAX_SUBSCALE = 255               # sc and mn are bytes
SOURCE = Path(__file__).with_name("vnni_gemm.cpp")


def _extension():
    """(module, None) or (None, reason)."""
    return load_extension("specd_vnni_gemm", SOURCE, "avx2")


def available() -> bool:
    return _extension()[0] is not None


def unavailable_reason() -> str | None:
    return _extension()[1]


def isa() -> str | None:
    """The instruction path calls take on this processor: "avx512_vnni" or "avx2" (None: the kernel does not run)."""
    module = _extension()[0]
    return module.isa() if module is not None else None


def force_avx2(on: bool) -> None:
    """Pin the AVX2 path on a processor that also has AVX-512 VNNI (tests compare the two paths' bits)."""
    _extension()[0].force_avx2(on)


def superblock_groups(in_features: int) -> int:
    """Groups per super-block of a weight with `in_features` columns (a multiple of 32)."""
    return next(g for g in SUPERBLOCK_GROUPS if in_features % (GROUP * g) == 0)


@dataclass(frozen=True)
class GroupCodes:
    """An unpacked [N, K] weight in the kernel's form: w = d·sc·q − dmin·mn (per row and group of 32)."""
    codes: torch.Tensor             # [N, K] uint8, 0..2^bits − 1
    sc: torch.Tensor                # [N, K / 32] uint8
    mn: torch.Tensor                # [N, K / 32] uint8
    d: torch.Tensor                 # [N, K / 32] float16, equal within each super-block
    dmin: torch.Tensor              # [N, K / 32] float16, equal within each super-block
    bits: int

    def dequantized(self) -> torch.Tensor:     # [N, K] float32
        step = (self.d.float() * self.sc.float()).repeat_interleave(GROUP, 1)
        low = (self.dmin.float() * self.mn.float()).repeat_interleave(GROUP, 1)
        return self.codes.float() * step - low


def quantize_groups(weight: torch.Tensor, bits: int) -> GroupCodes:
    """Asymmetric per group of 32 over [min(0, lo), max(0, hi)]; the groups' minimums and steps are 8-bit
    multiples of a float16 per super-block, rounded up so that the grid still covers the group (nothing clips);
    the codes are picked against that rounded grid."""
    n, k = weight.shape
    g = superblock_groups(k)
    top = (1 << bits) - 1
    w = weight.float().reshape(n, k // GROUP, GROUP)                          # [N, groups, 32]
    lo, hi = w.amin(-1).clamp(max=0), w.amax(-1).clamp(min=0)                # [N, groups]
    dmin = _per_superblock(-lo, g, MAX_SUBSCALE)                             # [N, groups] float16
    mn = _ratio_up(-lo, dmin).clamp(0, MAX_SUBSCALE)
    offset = dmin.float() * mn                                                # >= -lo
    step = (hi + offset) / top                                                # covers [-offset, hi]
    d = _per_superblock(step, g, MAX_SUBSCALE)
    sc = _ratio_up(step, d).clamp(0, MAX_SUBSCALE)
    grid = (d.float() * sc)[..., None]                                        # [N, groups, 1]
    codes = torch.where(grid > 0, (w + offset[..., None]) / grid.clamp(min=1e-30), 0).round().clamp(0, top)
    return GroupCodes(codes.reshape(n, k).to(torch.uint8), sc.to(torch.uint8), mn.to(torch.uint8), d, dmin, bits)


def _per_superblock(v: torch.Tensor, g: int, top: int) -> torch.Tensor:
    """One float16 unit per super-block such that v / unit <= top (the unit is rounded up, never down)."""
    n, groups = v.shape
    peak = v.reshape(n, groups // g, g).amax(-1) / top                        # [N, super-blocks]
    unit = peak.to(torch.float16)
    unit = torch.where(unit.float() < peak, torch.nextafter(unit, torch.full_like(unit, torch.inf)), unit)
    return unit.repeat_interleave(g, 1)


def _ratio_up(v: torch.Tensor, unit: torch.Tensor) -> torch.Tensor:
    u = unit.float()
    return torch.where(u > 0, torch.ceil(v / u.clamp(min=1e-30) - 1e-6), 0)


@dataclass(eq=False)
class VnniWeight:
    """A [N, K] weight packed for the kernel; `matmul(x [M, K]) -> [M, N]` in x's dtype."""
    codes: torch.Tensor             # [N/16, K/32, bits·64] uint8
    sc: torch.Tensor                # [N/16, K/32, 16] uint8
    mn: torch.Tensor                # [N/16, K/32, 16] uint8
    d: torch.Tensor                 # [N/16, K/(32G), 16] float16
    dmin: torch.Tensor              # [N/16, K/(32G), 16] float16
    groups_per_superblock: int
    bits: int
    out_features: int
    in_features: int

    @property
    def method(self) -> str:
        return "int4" if self.bits == 4 else "int8"

    def matmul(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:   # x [M, K] -> [M, N]
        """x Wᵀ, plus `bias` [N] (x's dtype) added in the kernel exactly as `y + bias` would add it."""
        return _extension()[0].vnni_mm(x, self.codes, self.sc, self.mn, self.d, self.dmin,
                                        self.groups_per_superblock, self.bits, bias)

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in (self.codes, self.sc, self.mn, self.d, self.dmin))


def pack(gc: GroupCodes) -> VnniWeight:
    """`gc` in the kernel's layout."""
    n, k = gc.codes.shape
    g = superblock_groups(k)
    nt, ng = n // TILE, k // GROUP
    c = gc.codes.reshape(nt, TILE, ng, 8, 4).permute(0, 2, 3, 1, 4)          # [tiles, groups, operand, lane, 4]
    if gc.bits == 4:                  # byte block j: operand 2j low nibbles, 2j + 1 high
        c = c.reshape(nt, ng, 4, 2, TILE, 4)
        c = c[:, :, :, 0] | (c[:, :, :, 1] << 4)
    codes = c.contiguous().reshape(nt, ng, gc.bits * 64)

    def tiled(a: torch.Tensor, step: int) -> torch.Tensor:          # [N, groups] -> [tiles, groups/step, 16]
        a = a[:, ::step]
        return a.reshape(nt, TILE, a.shape[1]).permute(0, 2, 1).contiguous()

    return VnniWeight(codes, tiled(gc.sc, 1), tiled(gc.mn, 1), tiled(gc.d, g), tiled(gc.dmin, g), g, gc.bits, n, k)


def unpack(qw: VnniWeight) -> GroupCodes:
    """The inverse of `pack` (tests and quality reports)."""
    nt, ng, g = qw.out_features // TILE, qw.in_features // GROUP, qw.groups_per_superblock
    c = qw.codes.reshape(nt, ng, -1)
    if qw.bits == 4:
        c = c.reshape(nt, ng, 4, 1, TILE, 4)
        c = torch.cat([c & 15, c >> 4], dim=3)                                 # [tiles, groups, 4, 2, lane, 4]
    c = c.reshape(nt, ng, 8, TILE, 4).permute(0, 3, 1, 2, 4).reshape(qw.out_features, qw.in_features)

    def rows(a: torch.Tensor, repeat: int) -> torch.Tensor:         # [tiles, blocks, 16] -> [N, groups]
        return a.permute(0, 2, 1).reshape(qw.out_features, -1).repeat_interleave(repeat, 1)

    return GroupCodes(c.contiguous(), rows(qw.sc, 1), rows(qw.mn, 1), rows(qw.d, g), rows(qw.dmin, g), qw.bits)


def check_superblocks(gc: GroupCodes, what: str) -> None:
    """d and dmin must be one value per super-block (true of our quantizer and of Q4_K's 256-column blocks)."""
    g = superblock_groups(gc.codes.shape[1])
    for name, t in (("d", gc.d), ("dmin", gc.dmin)):
        blocks = t.reshape(t.shape[0], -1, g)
        if not torch.equal(blocks, blocks[..., :1].expand_as(blocks)):
            raise ValueError(f"{what}: {name} varies within a super-block of {g} groups")


if __name__ == "__main__":
    print(status_line(SOURCE, _extension()))
