"""Runs the model on one rank: owns its weights, its paged KV cache and every sequence's block table.

Every rank of a TP group holds an identical ModelRunner and is driven through the same calls in the same
order, so block tables stay identical across ranks without ever being sent.
"""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass

import torch

from common.config import EngineConfig, ModelConfig
from common.distributed import TPGroup, single_rank
from common.errors import ConfigError, SequenceTooLongError
from common.kv.block_allocator import BlockAllocator
from common.kv.block_table import BlockTable
from common.kv.kv_cache import PagedKVCache
from common.layers.attention import AttentionMetadata
from common.models.loader import load_weights
from common.models.registry import model_class

log = logging.getLogger(__name__)


@dataclass(slots=True)
class SequenceChunk:
    """New tokens for one sequence in one forward pass, and how many trailing positions need logits.

    Prefill: all prompt tokens, num_logits=1. Decode: one token, num_logits=1. Verify: the last committed
    token(s) + K drafts, num_logits=K+1. A sequence's first chunk starts it.
    """
    seq_id: int
    token_ids: list[int]
    num_logits: int = 1

    def __post_init__(self):
        if not self.token_ids:
            raise ValueError(f"sequence {self.seq_id}: a chunk needs at least one token")
        if not 1 <= self.num_logits <= len(self.token_ids):
            raise ValueError(f"sequence {self.seq_id}: num_logits={self.num_logits} must be in "
                             f"[1, {len(self.token_ids)}]")


@contextlib.contextmanager
def _default_dtype_device(dtype: torch.dtype, device: torch.device):
    old_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            yield
    finally:
        torch.set_default_dtype(old_dtype)


class ModelRunner:
    def __init__(self, config: EngineConfig, tp: TPGroup | None = None):
        self.config = config
        self.tp = tp or single_rank()
        self.model_config = ModelConfig.from_pretrained(config.model)
        config.check_model(self.model_config)
        if config.tp_size != self.tp.world_size:
            raise ConfigError(f"tp_size={config.tp_size} but the process group has {self.tp.world_size} rank(s)")
        self.device = torch.device(config.device if config.device != "cuda" else f"cuda:{self.tp.rank}")
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        self.dtype = config.torch_dtype
        self.max_model_len = config.resolved_max_model_len(self.model_config)
        cls = model_class(self.model_config.architecture)
        with _default_dtype_device(self.dtype, self.device):
            self.model = cls(self.model_config, self.tp, self.max_model_len, self.dtype)
        load_weights(self.model, config.model)
        self.model.eval()
        if self.device.type == "cpu" and config.cpu_prepack:
            self.model.prepack_cpu_weights()
        mc = self.model_config
        self.block_size = config.block_size
        num_blocks = config.resolved_num_kv_blocks(mc)
        self.kv_cache = PagedKVCache(mc.num_layers, num_blocks, self.block_size,
                                     mc.num_kv_heads // self.tp.world_size, mc.head_dim, self.dtype, self.device)
        self.allocator = BlockAllocator(num_blocks)
        self.sequences: dict[int, BlockTable] = {}

    # ---- sequence bookkeeping -------------------------------------------------------------------------------
    def num_tokens(self, seq_id: int) -> int:
        return self.sequences[seq_id].num_tokens if seq_id in self.sequences else 0

    def truncate(self, seq_id: int, new_len: int) -> None:
        """Roll a sequence back to its first `new_len` tokens (rejected drafts), freeing tail blocks."""
        self._table(seq_id).truncate(new_len, self.allocator)

    def free(self, seq_id: int) -> None:
        table = self.sequences.pop(seq_id, None)
        if table is not None:
            table.release(self.allocator)

    def _table(self, seq_id: int) -> BlockTable:
        try:
            return self.sequences[seq_id]
        except KeyError:
            raise KeyError(f"unknown sequence {seq_id}") from None

    # ---- forward ------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def forward(self, chunks: list[SequenceChunk]) -> list[torch.Tensor]:
        """Append each chunk's tokens to its sequence and return logits [num_logits_i, vocab] per chunk (float32)."""
        self._check_and_reserve(chunks)
        input_ids, positions, slot_mapping, logits_index = [], [], [], []
        offset = 0
        for c in chunks:
            table = self.sequences[c.seq_id]
            start, n = table.num_tokens, len(c.token_ids)
            input_ids.extend(c.token_ids)
            positions.extend(range(start, start + n))
            slot_mapping.extend(table.slots(start, start + n))
            logits_index.extend(range(offset + n - c.num_logits, offset + n))
            offset += n
        dev = self.device
        meta = self._attention_metadata(chunks, torch.tensor(slot_mapping, device=dev))
        logits = self.model(torch.tensor(input_ids, device=dev), torch.tensor(positions, device=dev),
                            self.kv_cache.layers, meta, torch.tensor(logits_index, device=dev))
        for c in chunks:
            self.sequences[c.seq_id].num_tokens += len(c.token_ids)
        logits = logits.float()
        return list(logits.split([c.num_logits for c in chunks]))

    def _check_and_reserve(self, chunks: list[SequenceChunk]) -> None:
        """Validate the whole batch, then allocate blocks for it: either all of it fits or nothing changes."""
        vocab = self.model_config.vocab_size
        seen = set()
        need = 0
        for c in chunks:
            if c.seq_id in seen:
                raise ValueError(f"sequence {c.seq_id} appears twice in one batch")
            seen.add(c.seq_id)
            bad = [t for t in c.token_ids if not 0 <= t < vocab]
            if bad:
                raise ValueError(f"sequence {c.seq_id}: token id {bad[0]} outside the vocabulary [0, {vocab})")
            table = self.sequences.get(c.seq_id)
            cur = table.num_tokens if table else 0
            new_len = cur + len(c.token_ids)
            if new_len > self.max_model_len:
                raise SequenceTooLongError(
                    f"sequence {c.seq_id}: {new_len} tokens ({cur} cached + {len(c.token_ids)} new) exceeds "
                    f"max_model_len={self.max_model_len}")
            need += table.blocks_needed(new_len) if table else -(-new_len // self.block_size)
        if len(self.sequences) + len(seen - self.sequences.keys()) > self.config.max_num_seqs:
            raise ConfigError(f"too many sequences: max_num_seqs={self.config.max_num_seqs}")
        if need > self.allocator.num_free:
            self.allocator.allocate(need)  # raises KVCacheExhaustedError with the counts
        for c in chunks:
            table = self.sequences.setdefault(c.seq_id, BlockTable(self.block_size))
            table.grow(table.num_tokens + len(c.token_ids), self.allocator)

    def _attention_metadata(self, chunks: list[SequenceChunk], slot_mapping: torch.Tensor) -> AttentionMetadata:
        dev = self.device
        q_lens = [len(c.token_ids) for c in chunks]
        ctx_lens = [self.sequences[c.seq_id].num_tokens + q for c, q in zip(chunks, q_lens)]
        b, max_q, max_ctx = len(chunks), max(q_lens), max(ctx_lens)
        if b == 1 and q_lens[0] == ctx_lens[0]:
            return AttentionMetadata(slot_mapping, slot_mapping.new_zeros(1, 1), None, None, 1, max_q,
                                     is_causal_prefill=True)
        context_slots = torch.zeros(b, max_ctx, dtype=torch.long)
        for i, c in enumerate(chunks):
            context_slots[i, :ctx_lens[i]] = torch.tensor(self.sequences[c.seq_id].slots(0, ctx_lens[i]))
        uniform = all(q == max_q for q in q_lens)
        query_index = None
        if not uniform:
            query_index = torch.tensor([i * max_q + j for i, q in enumerate(q_lens) for j in range(q)], device=dev)
        attn_mask = None
        if max_q > 1 or len(set(ctx_lens)) > 1:
            # Query j of sequence i sits at position ctx_i - max_q + j (right-aligned) or ctx_i - q_i + j;
            # it may see keys at positions <= its own. Padded query rows see key 0 only, to stay finite.
            key_pos = torch.arange(max_ctx)                                            # [max_ctx]
            q_pos = torch.tensor([[ctx - q + j if j < q else 0 for j in range(max_q)]
                                  for ctx, q in zip(ctx_lens, q_lens)])                 # [B, max_q]
            attn_mask = (key_pos.view(1, 1, -1) <= q_pos.unsqueeze(-1)).unsqueeze(1).to(dev)  # [B,1,max_q,max_ctx]
        return AttentionMetadata(slot_mapping, context_slots.to(dev), attn_mask, query_index, b, max_q)
