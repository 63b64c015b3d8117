"""Paged attention whose every query row is computed alone in one fixed order (`row_attention.cpp`).

Batch-invariant mode needs a token's attention output to be the same bits whatever else shares its forward pass.
torch's CPU flash kernel blocks queries by their count and keys in blocks of 512, so specd used to pad every call
to whole 32-query tiles and 512-key blocks (common/layers/batch_invariant.invariant_attention): correct, but a
1-token decode step then computes 32 x 512 scores per KV head, and attention took a third of a draft step. This
kernel reads only the keys each row sees, straight from the paged cache (no gather), in fp32: nothing to pad.
AVX-512 or AVX2 (the same bits). `available()` / `unavailable_reason()` as for the VNNI kernel; batch_invariant falls back to the padded flash path
where it cannot run, and proves whichever runs at switch-on (`check_attention`).
"""
from __future__ import annotations

from pathlib import Path

import torch

from common.kernels.build import load_extension, status_line

SOURCE = Path(__file__).with_name("row_attention.cpp")


def _extension():
    return load_extension("specd_row_attention", SOURCE, "avx2")


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


def row_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor,
                  q_pos: torch.Tensor, scale: float) -> torch.Tensor:
    """q [B, Q, H, D]; k_cache, v_cache [S, KVH, D]; slots [B, C] (the cache slot of each context position);
    q_pos [B, Q] (query (b, i) sees positions 0..q_pos[b, i]) -> [B, Q, H·D] in q's dtype."""
    return _extension()[0].row_attention(q, k_cache, v_cache, slots, q_pos, scale)


if __name__ == "__main__":
    print(status_line(SOURCE, _extension()))
