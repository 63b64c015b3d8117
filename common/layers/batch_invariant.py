"""Batch-invariant numerics: a token's logits do not depend on how many other tokens share its forward pass.

Without it, in bf16 a (K+1)-row verify pass and a 1-row decode pass round differently and near-ties flip, so
speculative output can drift from target-only output. What varies was measured here (torch 2.13 CPU, oneDNN):

- **Matmuls.** oneDNN picks its kernel by row count: 1 row takes a matrix-vector path, an odd remainder row a
  different one, so a row's result depends on its neighbours. Padding every call to a multiple of a small row
  tile makes one kernel variant run for every row. The tile is found per weight shape when the mode is switched
  on (`find_row_tile`: the smallest tile whose outputs are bitwise equal for every row count probed). It is 2 for
  oneDNN's bf16 kernels on an AVX-512 EPYC, 1 for the VNNI int4/int8 kernel; a machine whose kernels need more gets more, and one whose kernels no tile fixes is refused.
- **Attention.** `paged_invariant_attention` runs specd's own kernel where it can (common/kernels/row_attention.py:
  every query row computed alone in a fixed order, reading only the keys it sees, straight from the paged cache).
  Elsewhere it falls back to torch's CPU flash kernel, which blocks queries by their count (32 rows under 192) and
  keys in blocks of 512, a partial block computing in a shape-dependent order: `invariant_attention` feeds it only
  whole blocks (query rows padded to 32-row tiles, keys to whole 512-blocks; padding only ever adds masked rows or
  fully masked key blocks, which leave each row's online softmax bit for bit unchanged). The padding makes a
  1-token decode step compute 32 x 512 scores per KV head; the kernel computes 1 x its context. `check_attention`
  proves whichever runs at switch-on on the machine's own kernels.
- RMSNorm (row-wise reductions), RoPE, SiLU, residual adds and the TP all-reduce (two operands, commutative) do not
  vary with the row count; the tests check the whole model.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from common.errors import ConfigError
from common.kernels import row_attention

KV_BLOCK = 512                     # torch's CPU flash-attention key split: pad key lengths to whole blocks
ROW_TILES = (1, 2, 4, 8, 16, 32)   # candidate row tiles, cheapest first (1: a kernel whose rows never interact,
                                   # as the VNNI one: common/kernels/vnni_gemm.py)
PROBE_ROWS = (1, 2, 3, 5, 8, 9, 16, 17, 33, 40)
Q_TILE = 32                        # query rows per flash-kernel block (its split for calls under 192 rows)
Q_TILES_PER_CALL = 5               # 160 rows per call: the kernel keeps its 32-row split


def pad_rows(x: torch.Tensor, tile: int) -> torch.Tensor:
    """x [n, in] -> [ceil(n / tile) * tile, in], zero rows appended."""
    extra = -x.shape[0] % tile
    return x if extra == 0 else torch.cat([x, x.new_zeros(extra, x.shape[1])])


def find_row_tile(matmul: Callable[[torch.Tensor], torch.Tensor], in_features: int, dtype: torch.dtype,
                  device: torch.device) -> int:
    """The smallest tile t such that `matmul` of rows padded to a multiple of t gives each row the same bits
    whatever else is in the call; ConfigError when no tile does."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(max(PROBE_ROWS), in_features, generator=g).to(dtype=dtype, device=device)   # [rows, in]
    for tile in ROW_TILES:
        alone = torch.cat([matmul(pad_rows(x[j:j + 1], tile))[:1] for j in range(x.shape[0])])      # [rows, out]
        if all(torch.equal(matmul(pad_rows(x[:m], tile))[:m], alone[:m]) for m in PROBE_ROWS):     # one call per m
            return tile
    raise ConfigError(f"batch_invariant: no row tile in {ROW_TILES} makes a [{in_features}]-input {dtype} matmul "
                      "row-invariant on this machine's kernels; run without batch_invariant")


def invariant_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, q_pos: torch.Tensor,
                        scale: float) -> torch.Tensor:
    """Attention in which every query row gets the same bits whatever rows, sequences or padding share the call.

    q [B, max_q, H, D]; keys, values [B, KVH, L, D] with L a multiple of KV_BLOCK; q_pos [B, max_q] the position
    of each query (it sees keys 0..q_pos) -> [B, max_q, H·D].

    The query heads that share a KV head become rows of that head ((query, group) pairs), padded to whole tiles
    of Q_TILE rows, and each call holds at most Q_TILES_PER_CALL tiles: torch's CPU flash kernel then always
    multiplies exact Q_TILE-row blocks by exact KV_BLOCK-key blocks. Each call reads keys only up to the last
    block any of its rows can see; blocks past a row's position are fully masked, which changes nothing.
    """
    b, max_q, h, d = q.shape
    kvh, length = keys.shape[1], keys.shape[2]
    g = h // kvh
    rows = max_q * g
    qr = q.reshape(b, max_q, kvh, g, d).permute(0, 2, 1, 3, 4).reshape(b, kvh, rows, d)   # [B, KVH, rows, D]
    pos = q_pos.unsqueeze(-1).expand(b, max_q, g).reshape(b, 1, rows)                     # [B, 1, rows]
    pad = -rows % Q_TILE
    if pad:
        qr = torch.cat([qr, qr.new_zeros(b, kvh, pad, d)], dim=2)
        pos = torch.cat([pos, pos.new_zeros(b, 1, pad)], dim=2)                           # pad rows see key 0
    key_pos = torch.arange(length, device=q.device)                                        # [L]
    step = Q_TILE * Q_TILES_PER_CALL
    out = []
    for s in range(0, qr.shape[2], step):
        p = pos[:, :, s:s + step]                                                          # [B, 1, r]
        seen = padded_key_length(int(p.max()) + 1)
        mask = key_pos[:seen].view(1, 1, 1, -1) <= p.unsqueeze(-1)                         # [B, 1, r, seen]
        out.append(F.scaled_dot_product_attention(qr[:, :, s:s + step], keys[:, :, :seen], values[:, :, :seen],
                                                  attn_mask=mask, scale=scale))            # [B, KVH, r, D]
    o = (out[0] if len(out) == 1 else torch.cat(out, dim=2))[:, :, :rows]
    return o.reshape(b, kvh, max_q, g, d).permute(0, 2, 1, 3, 4).reshape(b, max_q, h * d)


def row_kernel_runs(q: torch.Tensor) -> bool:
    """Whether specd's row attention kernel serves queries like `q` here (CPU, fp32 or bf16, AVX-512)."""
    return q.dtype in (torch.float32, torch.bfloat16) and q.device.type == "cpu" and row_attention.available()


def paged_invariant_attention(q: torch.Tensor, k_flat: torch.Tensor, v_flat: torch.Tensor,
                              context_slots: torch.Tensor, q_pos: torch.Tensor, scale: float) -> torch.Tensor:
    """Batch-invariant attention over a paged cache. q [B, max_q, H, D]; k_flat, v_flat [num_slots, KVH, D];
    context_slots [B, L] the slot of each context position (L a multiple of KV_BLOCK); q_pos [B, max_q]
    -> [B, max_q, H·D]. specd's row kernel where it runs, else the padded flash path."""
    if row_kernel_runs(q):
        return row_attention.row_attention(q, k_flat, v_flat, context_slots, q_pos, scale)
    keys = k_flat[context_slots].transpose(1, 2)                  # [B, KVH, L, D]
    values = v_flat[context_slots].transpose(1, 2)
    return invariant_attention(q, keys, values, q_pos, scale)


def padded_key_length(max_ctx: int) -> int:
    return -(-max_ctx // KV_BLOCK) * KV_BLOCK


def check_attention(num_heads: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype,
                    device: torch.device) -> None:
    """Prove `paged_invariant_attention` row-invariant on this machine's kernels (a verify chunk vs each row alone
    vs one more padded block, across a block boundary, the context in scattered cache slots); ConfigError if not."""
    g = torch.Generator().manual_seed(1)
    ctx, q_len = KV_BLOCK + 37, 31                  # 31 queries x the group: more than one call's rows
    length = padded_key_length(ctx)
    num_slots = length + KV_BLOCK
    k_flat = torch.randn(num_slots, num_kv_heads, head_dim, generator=g).to(dtype=dtype, device=device)
    v_flat = torch.randn(k_flat.shape, generator=g).to(dtype=dtype, device=device)
    slots = torch.randperm(num_slots, generator=g).view(1, -1).to(device)                # [1, positions]
    q = torch.randn(1, q_len, num_heads, head_dim, generator=g).to(dtype=dtype, device=device)
    pos = torch.arange(ctx - q_len, ctx, device=device).view(1, -1)                      # crosses a block edge
    scale = head_dim ** -0.5
    chunk = paged_invariant_attention(q, k_flat, v_flat, slots[:, :length], pos, scale)
    for j in range(q_len):
        own = padded_key_length(int(pos[0, j]) + 1)
        alone = paged_invariant_attention(q[:, j:j + 1], k_flat, v_flat, slots[:, :own], pos[:, j:j + 1], scale)
        wider = paged_invariant_attention(q[:, j:j + 1], k_flat, v_flat, slots[:, :own + KV_BLOCK],
                                          pos[:, j:j + 1], scale)
        if not (torch.equal(chunk[:, j], alone[:, 0]) and torch.equal(alone, wider)):
            raise ConfigError(f"batch_invariant: attention ({num_heads} heads, {num_kv_heads} KV heads, {dtype}) "
                              "is not row-invariant on this machine's kernels; run without batch_invariant")


class RowTiled:
    """A layer whose `matmul(x)` ([n, in] -> [n, out], no communication) is padded to a multiple of `row_tile`
    rows once batch-invariant mode sets it (None: as is)."""
    row_tile: int | None = None

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def tiled_matmul(self, x: torch.Tensor) -> torch.Tensor:
        if self.row_tile is None:
            return self.matmul(x)
        return self.matmul(pad_rows(x, self.row_tile))[:x.shape[0]]


def matmuls_rows_independent(model: torch.nn.Module) -> bool:
    """Whether every matmul of `model` runs the VNNI kernel, whose rows never interact (each row's sums and float
    operations are the same in every pass: tests/common/kernels/test_vnni_gemm.py), so the matmuls need no row tile."""
    from common.kernels.vnni_gemm import VnniWeight
    tiled = [m for m in model.modules() if isinstance(m, RowTiled)]
    return bool(tiled) and all(isinstance(getattr(m, "qweight", None), VnniWeight) for m in tiled)


def enable(model: torch.nn.Module, num_heads: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype,
           device: torch.device) -> dict[tuple[int, int], int]:
    """Switch a model's matmuls to their row tiles (found once per [in, out] shape) after proving attention
    invariant; -> {(in_features, out_features): row tile}. Call after prepacking: the tiles are the packed
    kernels'."""
    if device.type != "cpu":
        raise ConfigError(f"batch_invariant: measured on CPU kernels only, not on device={device.type!r}")
    check_attention(num_heads, num_kv_heads, head_dim, dtype, device)
    tiles: dict[tuple[int, int], int] = {}
    with torch.inference_mode():
        for module in model.modules():
            if isinstance(module, RowTiled):
                shape = (module.in_features, module.out_features)
                if shape not in tiles:
                    tiles[shape] = find_row_tile(module.matmul, module.in_features, dtype, device)
                module.row_tile = tiles[shape]
    return tiles
