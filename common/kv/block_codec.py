"""The bytes of one cached KV block: a fixed header, the block's token ids, then raw K/V tensor bytes.

No pickle: a value read from a shared store is parsed field by field and rejected (None) unless its header
matches the reader's geometry exactly, its token ids are the ones asked for (ruling out hash collisions)
and its length is right.
"""
from __future__ import annotations

import struct
import warnings
from dataclasses import dataclass

import torch

MAGIC = b"SPKV"
VERSION = 1
_HEADER = struct.Struct("<4sBBHHHHH")       # magic, version, dtype code, block_size, layers, kv_heads, head_dim, 0
_DTYPE_CODES = {torch.float32: 1, torch.bfloat16: 2, torch.float16: 3}


@dataclass(frozen=True, slots=True)
class BlockGeometry:
    """What one rank's block looks like: K/V of [2, num_layers, block_size, num_kv_heads, head_dim]."""
    dtype: torch.dtype
    block_size: int
    num_layers: int
    num_kv_heads: int                        # this rank's share
    head_dim: int

    @property
    def shape(self) -> tuple[int, ...]:
        return (2, self.num_layers, self.block_size, self.num_kv_heads, self.head_dim)

    @property
    def payload_bytes(self) -> int:
        n = 2 * self.num_layers * self.block_size * self.num_kv_heads * self.head_dim
        return n * torch.empty((), dtype=self.dtype).element_size()

    def header(self) -> bytes:
        return _HEADER.pack(MAGIC, VERSION, _DTYPE_CODES[self.dtype], self.block_size, self.num_layers,
                            self.num_kv_heads, self.head_dim, 0)

    @property
    def value_bytes(self) -> int:
        return _HEADER.size + 4 * self.block_size + self.payload_bytes


def encode_block(geometry: BlockGeometry, token_ids: list[int], kv: torch.Tensor) -> bytes:
    """kv: [2, num_layers, block_size, num_kv_heads, head_dim] on any device."""
    if tuple(kv.shape) != geometry.shape or kv.dtype != geometry.dtype:
        raise ValueError(f"block K/V {tuple(kv.shape)} {kv.dtype} does not match {geometry}")
    if len(token_ids) != geometry.block_size:
        raise ValueError(f"{len(token_ids)} token ids for a block of {geometry.block_size}")
    raw = kv.detach().to("cpu").contiguous().view(torch.uint8).numpy().tobytes()
    return geometry.header() + struct.pack(f"<{len(token_ids)}i", *token_ids) + raw


def decode_block(geometry: BlockGeometry, token_ids: list[int], value: bytes) -> torch.Tensor | None:
    """The block's K/V [2, num_layers, block_size, kv_heads, head_dim], or None if `value` is not that block.

    The tensor is a read-only view of `value` (no copy): copy it before writing."""
    if len(value) != geometry.value_bytes or value[:_HEADER.size] != geometry.header():
        return None
    start = _HEADER.size
    stored = struct.unpack_from(f"<{geometry.block_size}i", value, start)
    if list(stored) != list(token_ids):
        return None
    start += 4 * geometry.block_size
    with warnings.catch_warnings():            # read-only view of `value`: the caller copies it into the KV
        warnings.simplefilter("ignore", UserWarning)
        raw = torch.frombuffer(value, dtype=torch.uint8, offset=start)
    return raw.view(geometry.dtype).view(geometry.shape)
