"""Under int4, load a GGUF's own Q4_K blocks into the int4 kernel's layout: its 4-bit codes as they are.

A Q4_K super-block holds 256 weights as 8 sub-blocks of 32: w = d·sc_s·q − dmin·m_s with q in 0..15, 6-bit sc_s and
m_s per sub-block and fp16 d, dmin per super-block. That is the VNNI kernel's own form (common/kernels/
vnni_gemm.py: 8-bit sc and mn per group of 32, fp16 d and dmin per super-block), so there everything loads
exactly: codes, sub-scales and scales. PyTorch's int4 kernel (the fallback on other processors) takes
w = q·scale + offset per group: codes load unchanged, scale = d·sc_s and offset = −dmin·m_s, rounded to the
activation dtype (8 bits of mantissa under bf16).

Every other GGUF type (Q6_K, Q5_0, Q8_0, …) is requantized: the model folder holds the GGUF dequantized (`make
models` converts it), and those rows are quantized from there like any checkpoint. `GgufCodes.report()` says which
tensors were loaded exactly and which requantized. The folder and the file must be the same model: every exact
tensor's dequantized weights are checked against the folder's before they replace them.

The pair `make models` fetches is qwen2 (no Q/K permutation between GGUF and Hugging Face layouts); other
architectures are refused by name.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from common.errors import CheckpointError, ConfigError
from common.kernels.vnni_gemm import GROUP as INT4_GROUP, GroupCodes

Q4_K_BLOCK_BYTES = 144          # fp16 d, fp16 dmin, 12 bytes of packed 6-bit scales and mins, 128 bytes of nibbles
Q4_K_WEIGHTS = 256
ARCHITECTURES = ("qwen2",)

# our fused module -> its parts' GGUF tensor names (per layer), in the order their rows are concatenated
PARTS = {"self_attn.qkv_proj": ("attn_q", "attn_k", "attn_v"), "self_attn.o_proj": ("attn_output",),
         "mlp.gate_up_proj": ("ffn_gate", "ffn_up"), "mlp.down_proj": ("ffn_down",)}


@dataclass(frozen=True)
class Int4Rows:
    """Exact int4 rows for one part of a layer's shard: w = d·sc·q − dmin·mn per group of 32."""
    row_start: int                  # first row within the layer's shard
    groups: GroupCodes              # codes [rows, in] and per-group sc, mn, d, dmin [rows, in / 32]

    @property
    def codes(self) -> torch.Tensor:            # [rows, in] int32 in 0..15
        return self.groups.codes.to(torch.int32)

    @property
    def scale(self) -> torch.Tensor:            # [rows, in / 32] float32
        return self.groups.d.float() * self.groups.sc.float()

    @property
    def offset(self) -> torch.Tensor:           # [rows, in / 32] float32
        return -(self.groups.dmin.float() * self.groups.mn.float())

    def dequantized(self) -> torch.Tensor:      # [rows, in] float32
        return self.groups.dequantized()

    def columns(self, cols: slice) -> "Int4Rows":
        """The rows restricted to input columns `cols` (whole groups): a row-parallel rank's shard."""
        groups = slice(cols.start // INT4_GROUP, cols.stop // INT4_GROUP)
        g = self.groups
        return Int4Rows(self.row_start, GroupCodes(*(t[:, s].contiguous() for t, s in (
            (g.codes, cols), (g.sc, groups), (g.mn, groups), (g.d, groups), (g.dmin, groups))), bits=4))


def q4_k_rows(raw: np.ndarray) -> GroupCodes:
    """Decode Q4_K rows: raw [rows, n_super · 144] uint8 -> codes [rows, n_super · 256] and, per 32-weight
    sub-block [rows, n_super · 8], its 6-bit sc and mn and its super-block's fp16 d and dmin."""
    rows = raw.shape[0]
    blocks = np.ascontiguousarray(raw).reshape(rows, -1, Q4_K_BLOCK_BYTES)             # [rows, S, 144]
    d = blocks[..., 0:2].copy().view(np.float16)                                      # [rows, S, 1]
    dmin = blocks[..., 2:4].copy().view(np.float16)
    packed = blocks[..., 4:16].astype(np.int32)                                        # [rows, S, 12]
    lo, hi, extra = packed[..., 0:4], packed[..., 4:8], packed[..., 8:12]
    # sub-blocks 0-3: 6 bits in bytes 0-3 (scales) and 4-7 (mins); 4-7: 4 low bits in bytes 8-11, 2 high bits in
    # the top of bytes 0-3 (scales) and 4-7 (mins)
    sc = np.concatenate([lo & 63, (extra & 15) | ((lo >> 6) << 4)], axis=-1)           # [rows, S, 8]
    mn = np.concatenate([hi & 63, (extra >> 4) | ((hi >> 6) << 4)], axis=-1)
    nibbles = blocks[..., 16:].reshape(rows, -1, 4, 32)                                # [rows, S, chunk, 32]
    # chunk c: sub-block 2c in the low nibbles, 2c + 1 in the high ones
    codes = np.stack([nibbles & 15, nibbles >> 4], axis=3).reshape(rows, -1)           # [rows, S · 256]

    def per_group(a: np.ndarray) -> torch.Tensor:                                      # [rows, S, 1] -> [rows, S·8]
        return torch.from_numpy(np.repeat(a, 8, axis=-1).reshape(rows, -1).copy())

    def small(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(a.astype(np.uint8).reshape(rows, -1))

    return GroupCodes(torch.from_numpy(codes.astype(np.uint8)), small(sc), small(mn), per_group(d),
                      per_group(dmin), bits=4)


@dataclass
class GgufCodes:
    """The Q4_K tensors of one GGUF file, handed to each layer as this rank's exact int4 rows."""
    path: Path
    tensors: dict = field(default_factory=dict)         # GGUF name -> ReaderTensor
    exact: list[str] = field(default_factory=list)
    requantized: Counter = field(default_factory=Counter)

    @classmethod
    def open(cls, path: str | Path) -> "GgufCodes":
        from gguf import GGUFReader
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"gguf={str(path)!r}: no such file")
        try:
            reader = GGUFReader(str(path))
        except Exception as e:                          # a truncated or foreign file
            raise CheckpointError(f"{path}: not a readable GGUF file: {e}") from e
        arch = reader.fields.get("general.architecture")
        arch = bytes(arch.parts[arch.data[0]]).decode() if arch is not None else "?"
        if arch not in ARCHITECTURES:
            raise ConfigError(f"gguf={str(path)!r}: architecture {arch!r}; exact Q4_K loading supports "
                              f"{', '.join(ARCHITECTURES)} (quantize from the safetensors folder instead)")
        return cls(path, {t.name: t for t in reader.tensors})

    def rows_for(self, module_name: str, layer, tp_rank: int) -> list[Int4Rows]:
        """This rank's exact rows of `layer` (a column- or row-parallel linear named `module_name`)."""
        if not module_name.startswith("model.layers."):
            return []
        index, suffix = module_name[len("model.layers."):].split(".", 1)
        parts = PARTS.get(suffix)
        if parts is None:
            return []
        sizes = getattr(layer, "sizes_per_rank", None) or [getattr(layer, "output_size_per_rank", layer.out_features)]
        row_parallel = len(parts) == 1 and hasattr(layer, "input_size_per_rank")
        out, row_start = [], 0
        for part, size in zip(parts, sizes):
            name = f"blk.{index}.{part}.weight"
            tensor = self.tensors.get(name)
            if tensor is None:
                raise CheckpointError(f"{self.path.name}: tensor {name!r} missing (for {module_name})")
            kind = tensor.tensor_type.name
            if kind != "Q4_K":
                self.requantized[kind] += 1
                row_start += size
                continue
            raw = np.asarray(tensor.data)                                       # [out, bytes], memory-mapped
            if row_parallel:                                                    # groups never straddle shards
                cols = slice(tp_rank * layer.in_features, (tp_rank + 1) * layer.in_features)
                rows = Int4Rows(row_start, q4_k_rows(raw)).columns(cols)
            else:
                rows = Int4Rows(row_start, q4_k_rows(raw[tp_rank * size:(tp_rank + 1) * size]))
            out.append(rows)
            self.exact.append(name)
            row_start += size
        return out

    def report(self) -> str:
        kinds = ", ".join(f"{n} {k}" for k, n in sorted(self.requantized.items())) or "none"
        return (f"{self.path.name}: {len(self.exact)} Q4_K tensors loaded with their own 4-bit codes; "
                f"requantized from the dequantized folder: {kinds}")


def check_matches(rows: Int4Rows, dense: torch.Tensor, what: str) -> None:
    """The GGUF's rows must be the folder's weights (which are that GGUF dequantized, rounded to the folder dtype)."""
    ours = rows.dequantized()
    theirs = dense[rows.row_start:rows.row_start + ours.shape[0]].float()
    rel = 2.0 ** -7 if dense.dtype in (torch.bfloat16, torch.float16) else 1e-5
    bad = (ours - theirs).abs() > rel * ours.abs() + 1e-6
    if bad.any():
        raise CheckpointError(f"{what}: the GGUF's Q4_K weights differ from the model folder's "
                              f"({int(bad.sum())} of {bad.numel()} weights, max diff "
                              f"{(ours - theirs).abs().max().item():.3g}): not the same model")
