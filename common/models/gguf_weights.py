"""Under int4, load a GGUF's own Q4_K blocks into the int4 kernel's layout: its 4-bit codes as they are.

A Q4_K super-block holds 256 weights as 8 sub-blocks of 32: w = d·sc_s·q − dmin·m_s with q in 0..15, 6-bit sc_s and
m_s per sub-block and fp16 d, dmin per super-block. Our int4 layout is w = q·scale + offset per group of 32 input
columns (common/layers/quantization.py), so a sub-block is a group: codes load unchanged, scale = d·sc_s and
offset = −dmin·m_s (exact in float32; the kernel keeps them in the activation dtype, so under bf16 they round to
8 bits of mantissa, under float32 they stay exact).

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
from common.layers.quantization import INT4_GROUP

Q4_K_BLOCK_BYTES = 144          # fp16 d, fp16 dmin, 12 bytes of packed 6-bit scales and mins, 128 bytes of nibbles
Q4_K_WEIGHTS = 256
ARCHITECTURES = ("qwen2",)

# our fused module -> its parts' GGUF tensor names (per layer), in the order their rows are concatenated
PARTS = {"self_attn.qkv_proj": ("attn_q", "attn_k", "attn_v"), "self_attn.o_proj": ("attn_output",),
         "mlp.gate_up_proj": ("ffn_gate", "ffn_up"), "mlp.down_proj": ("ffn_down",)}


@dataclass(frozen=True)
class Int4Rows:
    """Exact int4 rows for one part of a layer's shard: w = codes · scale + offset."""
    row_start: int                  # first row within the layer's shard
    codes: torch.Tensor             # [rows, in] int32 in 0..15
    scale: torch.Tensor             # [rows, in / 32] float32
    offset: torch.Tensor            # [rows, in / 32] float32

    def dequantized(self) -> torch.Tensor:      # [rows, in] float32
        return (self.codes.float() * self.scale.repeat_interleave(INT4_GROUP, 1)
                + self.offset.repeat_interleave(INT4_GROUP, 1))


def q4_k_rows(raw: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Decode Q4_K rows: raw [rows, n_super · 144] uint8 -> codes [rows, n_super · 256] int32, and the scale and
    offset of each 32-weight sub-block, [rows, n_super · 8] float32."""
    rows = raw.shape[0]
    blocks = np.ascontiguousarray(raw).reshape(rows, -1, Q4_K_BLOCK_BYTES)             # [rows, S, 144]
    d = blocks[..., 0:2].copy().view(np.float16).astype(np.float32)                   # [rows, S, 1]
    dmin = blocks[..., 2:4].copy().view(np.float16).astype(np.float32)
    packed = blocks[..., 4:16].astype(np.int32)                                        # [rows, S, 12]
    lo, hi, extra = packed[..., 0:4], packed[..., 4:8], packed[..., 8:12]
    # sub-blocks 0-3: 6 bits in bytes 0-3 (scales) and 4-7 (mins); 4-7: 4 low bits in bytes 8-11, 2 high bits in
    # the top of bytes 0-3 (scales) and 4-7 (mins)
    sc = np.concatenate([lo & 63, (extra & 15) | ((lo >> 6) << 4)], axis=-1)           # [rows, S, 8]
    mn = np.concatenate([hi & 63, (extra >> 4) | ((hi >> 6) << 4)], axis=-1)
    nibbles = blocks[..., 16:].reshape(rows, -1, 4, 32)                                # [rows, S, chunk, 32]
    # chunk c: sub-block 2c in the low nibbles, 2c + 1 in the high ones
    codes = np.stack([nibbles & 15, nibbles >> 4], axis=3).reshape(rows, -1)           # [rows, S · 256]
    scale = (d * sc.astype(np.float32)).reshape(rows, -1)                              # [rows, S · 8]
    offset = -(dmin * mn.astype(np.float32)).reshape(rows, -1)
    return torch.from_numpy(codes.astype(np.int32)), torch.from_numpy(scale), torch.from_numpy(offset)


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
            if row_parallel:
                codes, scale, offset = q4_k_rows(raw)                           # groups never straddle shards
                cols = slice(tp_rank * layer.in_features, (tp_rank + 1) * layer.in_features)
                groups = slice(cols.start // INT4_GROUP, cols.stop // INT4_GROUP)
                rows = Int4Rows(row_start, codes[:, cols].contiguous(), scale[:, groups].contiguous(),
                                offset[:, groups].contiguous())
            else:
                codes, scale, offset = q4_k_rows(raw[tp_rank * size:(tp_rank + 1) * size])
                rows = Int4Rows(row_start, codes, scale, offset)
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
