"""Attention over a paged KV cache: the new tokens' K/V go into their slots (`store_kv`), then each context is
attended."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from common.layers.batch_invariant import paged_invariant_attention, row_kernel_runs


@dataclass(slots=True)
class AttentionMetadata:
    """Where a batch's tokens sit in the paged cache; built once per forward, shared by every layer.

    The batch is "varlen": num_tokens new tokens from num_seqs sequences, sequence i contributing q_i tokens
    appended after its c_i - q_i cached ones (prefill: c_i = q_i; decode: q_i = 1; verify: q_i = K + 1).
    """
    slot_mapping: torch.Tensor          # [num_tokens] cache slot each new token's K/V is written to
    context_slots: torch.Tensor         # [num_seqs, max_ctx] slots of each sequence's whole context (pad → 0)
    attn_mask: torch.Tensor | None      # [num_seqs, 1, max_q, max_ctx] True = may attend; None = no masking
    query_index: torch.Tensor | None    # [num_tokens] row of each token in the padded [num_seqs·max_q] layout
    num_seqs: int
    max_q: int
    is_causal_prefill: bool = False     # one sequence, all of it new: plain causal attention, no cache read
    # The position of each query in the padded layout (padding rows: 0): specd's row attention kernel reads each
    # row's keys by it (common/kernels/row_attention.py). In batch-invariant mode (common/layers/batch_invariant.py)
    # context_slots is padded to whole key blocks and attn_mask is None.
    q_pos: torch.Tensor | None = None   # [num_seqs, max_q]


class PagedAttention(nn.Module):
    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int):
        super().__init__()
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = head_dim ** -0.5

    def store_kv(self, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                 meta: AttentionMetadata) -> None:
        # k, v [T, KVH, D] -> their slots of k_cache, v_cache [num_blocks, block_size, KVH, D]
        k_cache.view(-1, self.num_kv_heads, self.head_dim)[meta.slot_mapping] = k
        v_cache.view(-1, self.num_kv_heads, self.head_dim)[meta.slot_mapping] = v

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                v_cache: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        # q [T, H, D]; k, v [T, KVH, D] (already in the cache: store_kv); k_cache, v_cache [num_blocks, block_size,
        # KVH, D] -> [T, H·D]
        k_flat = k_cache.view(-1, self.num_kv_heads, self.head_dim)  # [num_slots, KVH, D]
        v_flat = v_cache.view(-1, self.num_kv_heads, self.head_dim)
        gqa = self.num_heads != self.num_kv_heads
        if meta.is_causal_prefill:
            out = F.scaled_dot_product_attention(
                q.transpose(0, 1).unsqueeze(0), k.transpose(0, 1).unsqueeze(0), v.transpose(0, 1).unsqueeze(0),
                is_causal=True, scale=self.scale, enable_gqa=gqa)    # [1, H, T, D]
            return out.squeeze(0).transpose(0, 1).reshape(q.shape[0], -1)
        b, mq = meta.num_seqs, meta.max_q
        if meta.query_index is None:
            q_pad = q.view(b, mq, self.num_heads, self.head_dim)
        else:
            q_pad = q.new_zeros(b * mq, self.num_heads, self.head_dim)
            q_pad[meta.query_index] = q
            q_pad = q_pad.view(b, mq, self.num_heads, self.head_dim)
        if meta.q_pos is not None and (meta.attn_mask is None or row_kernel_runs(q_pad)):
            # the row kernel where it runs (faster than the masked flash call too), else the padded flash path
            out = paged_invariant_attention(q_pad, k_flat, v_flat, meta.context_slots, meta.q_pos,
                                            self.scale).reshape(b * mq, -1)                   # [B·max_q, H·D]
            return out if meta.query_index is None else out[meta.query_index]
        keys = k_flat[meta.context_slots].transpose(1, 2)           # [B, KVH, max_ctx, D]
        values = v_flat[meta.context_slots].transpose(1, 2)
        out = F.scaled_dot_product_attention(q_pad.transpose(1, 2), keys, values, attn_mask=meta.attn_mask,
                                             scale=self.scale, enable_gqa=gqa)  # [B, H, max_q, D]
        out = out.transpose(1, 2).reshape(b * mq, self.num_heads * self.head_dim)
        return out if meta.query_index is None else out[meta.query_index]
