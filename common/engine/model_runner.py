"""Runs the model on one rank: owns its weights, its paged KV cache and every sequence's block table.

Every rank of a TP group holds an identical ModelRunner and is driven through the same calls in the same
order, so block tables stay identical across ranks without ever being sent.
"""
from __future__ import annotations

import contextlib
import logging

import torch

from common.config import EngineConfig, ModelConfig
from common.distributed import TPGroup, single_rank
from common.engine.forward_io import ForwardOutput, SequenceChunk
from common.errors import ConfigError, SequenceTooLongError
from common.kv.block_allocator import BlockAllocator
from common.kv.block_codec import BlockGeometry
from common.kv.block_hash import chain_hashes, namespace_root, tenant_root
from common.kernels import vnni_gemm
from common.kv.block_table import BlockTable
from common.kv.kv_cache import PagedKVCache
from common.kv.prefix_cache import PrefixCache
from common.layers import batch_invariant
from common.layers.attention import AttentionMetadata
from common.layers.quantization import numerics_of
from common.models.fingerprint import model_fingerprint, model_fingerprint_of_file
from common.models.gguf_weights import GgufCodes
from common.models.loader import load_weights
from common.models.registry import model_class
from common.telemetry.metrics import PREFIX_CACHE_TOKENS

log = logging.getLogger(__name__)


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
        self.device = torch.device(config.device if config.device != "cuda" else f"cuda:{self.tp.local_rank}")
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        self.dtype = config.torch_dtype
        self.max_model_len = config.resolved_max_model_len(self.model_config)
        cls = model_class(self.model_config.architecture)
        with _default_dtype_device(self.dtype, self.device):
            self.model = cls(self.model_config, self.tp, self.max_model_len, self.dtype)
        load_weights(self.model, config.model)
        self.model.eval()
        if config.quantization != "none":
            gguf = GgufCodes.open(config.gguf) if config.gguf else None
            self.model.quantize_weights(config.quantization, gguf, head=config.lm_head_quantization)
            log.info("weights quantized: %s (kernel chosen for this processor%s; see bench-kernels)",
                     numerics_of(config.quantization),
                     f", instructions {vnni_gemm.isa()}" if numerics_of(config.quantization).endswith("/vnni") else "")
            if gguf is not None:
                log.info("%s", gguf.report())
        if self.device.type == "cpu" and config.cpu_prepack:
            self.model.prepack_cpu_weights()
        mc = self.model_config
        if config.batch_invariant:
            tp_size = self.tp.world_size
            tiles = batch_invariant.enable(self.model, mc.num_heads // tp_size, mc.num_kv_heads // tp_size,
                                           mc.head_dim, self.dtype, self.device)
            log.info("batch-invariant numerics on: row tiles %s", sorted(set(tiles.values())))
        why_not = self.model.flatten(self.device)
        log.info("decode and verify passes: %s", "one flat loop of kernel calls" if not why_not else
                 f"the layers' forward ({why_not})")
        # Where the flat loop runs (specd's layer ops and row attention: row by row) and every matmul is the VNNI
        # kernel's, only a prefill's flash attention makes a row's bits depend on what shares its pass (a K=auto
        # first round prefills the prompt with its drafts). Prefills then take the loop too: greedy speculation
        # equals target-only bit for bit without batch-invariant mode (docs/numerics.md).
        self.rows_independent = not why_not and batch_invariant.matmuls_rows_independent(self.model)
        if self.rows_independent and not config.batch_invariant:
            log.info("prefills: the flat loop too (every pass gives a row the same bits whatever shares it)")
        self.block_size = config.block_size
        num_blocks = config.resolved_num_kv_blocks(mc)
        self.kv_cache = PagedKVCache(mc.num_layers, num_blocks, self.block_size,
                                     mc.num_kv_heads // self.tp.world_size, mc.head_dim, self.dtype, self.device)
        self.allocator = BlockAllocator(num_blocks)
        self.sequences: dict[int, BlockTable] = {}
        self.prefix_cache: PrefixCache | None = None
        if config.prefix_cache is not None:
            self._init_prefix_cache(config)

    def _init_prefix_cache(self, config: EngineConfig) -> None:
        mc = self.model_config
        geometry = BlockGeometry(self.dtype, self.block_size, mc.num_layers, mc.num_kv_heads // self.tp.world_size,
                                 mc.head_dim)
        fingerprint = config.prefix_cache.namespace or model_fingerprint(config.model)
        # Blocks computed under int4 weights are not a bf16 model's blocks: the quantization (and the kernel that
        # computes it, common/layers/quantization.numerics_of) is part of the root.
        numerics = config.dtype if config.quantization == "none" else \
            f"{config.dtype}+{numerics_of(config.quantization)}"
        if config.gguf:
            numerics += f"+gguf:{model_fingerprint_of_file(config.gguf)}"
        self._prefix_root = namespace_root(fingerprint, numerics, self.block_size, self.tp.rank,
                                           self.tp.world_size)
        self.prefix_cache = PrefixCache(config.prefix_cache, geometry)
        self._tokens: dict[int, list[int]] = {}         # token ids whose K/V each sequence holds
        self._hashes: dict[int, list[bytes]] = {}       # chained hashes of its full blocks, as far as computed
        self._published: dict[int, int] = {}            # leading full blocks already in (or from) the cache
        self._roots: dict[int, bytes] = {}              # each sequence's chain root: its tenant's namespace

    def close(self) -> None:
        if self.prefix_cache is not None:
            self.prefix_cache.close()

    # ---- sequence bookkeeping -------------------------------------------------------------------------------
    def num_tokens(self, seq_id: int) -> int:
        return self.sequences[seq_id].num_tokens if seq_id in self.sequences else 0

    def truncate(self, seq_id: int, new_len: int) -> None:
        """Roll a sequence back to its first `new_len` tokens (rejected drafts), freeing tail blocks.

        What is left is committed, so with a prefix cache its newly full blocks are published here."""
        self._table(seq_id).truncate(new_len, self.allocator)
        if self.prefix_cache is not None and seq_id in self._tokens:
            full = new_len // self.block_size
            del self._tokens[seq_id][new_len:]
            del self._hashes[seq_id][full:]
            self._published[seq_id] = min(self._published[seq_id], full)
            self._publish(seq_id)

    def free(self, seq_id: int) -> None:
        table = self.sequences.pop(seq_id, None)
        if table is not None:
            table.release(self.allocator)
        if self.prefix_cache is not None:
            for d in (self._tokens, self._hashes, self._published, self._roots):
                d.pop(seq_id, None)

    def _table(self, seq_id: int) -> BlockTable:
        try:
            return self.sequences[seq_id]
        except KeyError:
            raise KeyError(f"unknown sequence {seq_id}") from None

    # ---- forward ------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def forward(self, chunks: list[SequenceChunk]) -> ForwardOutput:
        """Append each chunk's tokens to its sequence; return logits [num_logits_i, vocab] per chunk (float32).

        With a prefix cache, a new sequence's leading full blocks are loaded instead of computed when cached
        (`ForwardOutput.cached_tokens` says how many tokens per chunk)."""
        loaded: list[int] = []
        cached = [0] * len(chunks)
        if self.prefix_cache is not None:
            chunks, cached, loaded = self._load_prefixes(chunks)
        try:
            self._check_and_reserve(chunks)
        except BaseException:
            for seq_id in loaded:                   # all or nothing: a refused batch leaves no trace
                self.free(seq_id)
            raise
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
        if self.prefix_cache is not None:
            for c in chunks:
                self._tokens.setdefault(c.seq_id, []).extend(c.token_ids)
                self._hashes.setdefault(c.seq_id, [])
                self._published.setdefault(c.seq_id, 0)
                if c.seq_id not in self._roots:
                    self._roots[c.seq_id] = tenant_root(self._prefix_root, c.cache_namespace)
        logits = logits.float()                                                   # [sum num_logits_i, vocab]
        return ForwardOutput(list(logits.split([c.num_logits for c in chunks])), cached)

    # ---- prefix cache -------------------------------------------------------------------------------------
    def _load_prefixes(self, chunks: list[SequenceChunk]) -> tuple[list[SequenceChunk], list[int], list[int]]:
        """Load cached leading blocks of new sequences; -> (chunks left to compute, cached tokens, loaded seqs).

        Each rank reads its own shard; the ranks agree on the shortest run any of them found, so their
        block tables stay identical. The tokens that need logits are always computed."""
        bs = self.block_size
        new = [i for i, c in enumerate(chunks) if c.seq_id not in self.sequences]
        if len({chunks[i].seq_id for i in new}) < len(new):
            return chunks, [0] * len(chunks), []            # a sequence twice: the batch check refuses it
        wanted: dict[int, list[bytes]] = {}
        for i in new:
            c = chunks[i]
            if (len(c.token_ids) - c.num_logits) // bs >= 1:
                root = tenant_root(self._prefix_root, c.cache_namespace)     # a tenant finds only its own blocks
                wanted[i] = chain_hashes(root, c.token_ids, bs, (len(c.token_ids) - c.num_logits) // bs)
        if not wanted:
            if self.tp.is_driver:
                PREFIX_CACHE_TOKENS.labels("computed").inc(sum(len(chunks[i].token_ids) for i in new))
            return chunks, [0] * len(chunks), []
        found = {i: self.prefix_cache.lookup(h, chunks[i].token_ids) for i, h in wanted.items()}
        counts = torch.tensor([len(found.get(i, ())) for i in range(len(chunks))], device=self.device)
        counts = self.tp.all_reduce_min(counts).tolist()
        out, cached, loaded = [], [], []
        for i, c in enumerate(chunks):
            m = counts[i]
            if m and m <= self.allocator.num_free:  # identical on every rank, like the counts
                table = BlockTable(bs)
                table.blocks = self.allocator.allocate(m)
                table.num_tokens = m * bs
                kv = torch.stack(found[i][:m], dim=2).to(self.device)         # [2, layers, m, bs, kv_heads, hd]
                self.kv_cache.storage[:, :, table.blocks] = kv
                self.sequences[c.seq_id] = table
                self._tokens[c.seq_id] = c.token_ids[:m * bs]
                self._hashes[c.seq_id] = wanted[i][:m]
                self._published[c.seq_id] = m
                loaded.append(c.seq_id)
                c = SequenceChunk(c.seq_id, c.token_ids[m * bs:], c.num_logits, c.cache_namespace)
            else:
                m = 0
            if i in new and self.tp.is_driver:
                PREFIX_CACHE_TOKENS.labels("cached").inc(m * bs)
                PREFIX_CACHE_TOKENS.labels("computed").inc(len(c.token_ids))
            cached.append(m * bs)
            out.append(c)
        return out, cached, loaded

    def _publish(self, seq_id: int) -> None:
        """Hand the sequence's full, not yet published blocks to the cache (copies; stored off this thread)."""
        bs, table = self.block_size, self.sequences[seq_id]
        start, full = self._published[seq_id], table.num_tokens // bs
        if full <= start:
            return
        tokens = self._tokens[seq_id]
        hashes = chain_hashes(self._roots[seq_id], tokens, bs, full, known=self._hashes[seq_id])
        self._hashes[seq_id] = hashes
        index = torch.tensor(table.blocks[start:full], device=self.device)
        kv = self.kv_cache.storage.index_select(2, index).permute(2, 0, 1, 3, 4, 5)   # [n, 2, layers, bs, h, hd]
        self.prefix_cache.publish(hashes[start:full], [tokens[j * bs:(j + 1) * bs] for j in range(start, full)],
                                  kv.contiguous())
        self._published[seq_id] = full

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
        invariant = self.config.batch_invariant
        q_lens = [len(c.token_ids) for c in chunks]
        ctx_lens = [self.sequences[c.seq_id].num_tokens + q for c, q in zip(chunks, q_lens)]
        b, max_q, max_ctx = len(chunks), max(q_lens), max(ctx_lens)
        if b == 1 and q_lens[0] == ctx_lens[0] and not (invariant or self.rows_independent):
            return AttentionMetadata(slot_mapping, slot_mapping.new_zeros(1, 1), None, None, 1, max_q,
                                     is_causal_prefill=True)
        # Batch-invariant mode: contexts padded to whole key blocks (common/layers/batch_invariant.py).
        length = batch_invariant.padded_key_length(max_ctx) if invariant else max_ctx
        context_slots = torch.zeros(b, length, dtype=torch.long)                       # pad -> slot 0, masked
        for i, c in enumerate(chunks):
            context_slots[i, :ctx_lens[i]] = torch.tensor(self.sequences[c.seq_id].slots(0, ctx_lens[i]))
        uniform = all(q == max_q for q in q_lens)
        query_index = None
        if not uniform:
            query_index = torch.tensor([i * max_q + j for i, q in enumerate(q_lens) for j in range(q)], device=dev)
        # Query j of sequence i sits at position ctx_i - max_q + j (right-aligned) or ctx_i - q_i + j;
        # it may see keys at positions <= its own. Padded query rows see key 0 only, to stay finite.
        q_pos = torch.tensor([[ctx - q + j if j < q else 0 for j in range(max_q)]
                              for ctx, q in zip(ctx_lens, q_lens)])                     # [B, max_q]
        if invariant:
            return AttentionMetadata(slot_mapping, context_slots.to(dev), None, query_index, b, max_q,
                                     q_pos=q_pos.to(dev))
        attn_mask = None
        if max_q > 1 or len(set(ctx_lens)) > 1:
            key_pos = torch.arange(max_ctx)                                            # [max_ctx]
            attn_mask = (key_pos.view(1, 1, -1) <= q_pos.unsqueeze(-1)).unsqueeze(1).to(dev)  # [B,1,max_q,max_ctx]
        return AttentionMetadata(slot_mapping, context_slots.to(dev), attn_mask, query_index, b, max_q,
                                 q_pos=q_pos.to(dev))
