"""One decoder for the Qwen2 / Qwen3 / Llama family, built from tensor-parallel layers.

Qwen2: q/k/v bias. Qwen3: per-head RMSNorm on q and k. Llama 3: rope scaling. Tied or untied LM head; GQA.
"""
from __future__ import annotations

import torch
from torch import nn

from common.config import ModelConfig
from common.distributed import TPGroup
from common.kernels import layer_ops
from common.layers.activation import SiluAndMul
from common.layers.attention import AttentionMetadata, PagedAttention
from common.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from common.layers.linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from common.layers.norm import RMSNorm
from common.layers.rotary import RotaryEmbedding
from common.models.flat_decoder import FlatDecoder


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, tp: TPGroup, rotary: RotaryEmbedding):
        super().__init__()
        self.num_heads = cfg.num_heads // tp.world_size
        self.num_kv_heads = cfg.num_kv_heads // tp.world_size
        self.head_dim = cfg.head_dim
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.qkv_proj = QKVParallelLinear(cfg.hidden_size, cfg.head_dim, cfg.num_heads, cfg.num_kv_heads,
                                          cfg.qkv_bias, tp)
        self.o_proj = RowParallelLinear(cfg.num_heads * cfg.head_dim, cfg.hidden_size, False, tp)
        self.rotary = rotary                                          # one cos/sin table shared by all layers
        if cfg.qk_norm:
            self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)
        else:
            self.q_norm = self.k_norm = None
        self.attn = PagedAttention(self.num_heads, self.num_kv_heads, self.head_dim)

    def forward(self, positions, hidden, k_cache, v_cache, meta: AttentionMetadata) -> torch.Tensor:
        qkv = self.qkv_proj(hidden)                                   # [T, q_size + 2·kv_size]
        fused = self.q_norm is None and layer_ops.runs(qkv) and qkv.is_contiguous()
        if fused:                  # RoPE in place and the cache write, one call (common/kernels/layer_ops.py)
            layer_ops.rope_store_kv(qkv, positions, self.rotary.cos, self.rotary.sin, self.num_heads,
                                    self.num_kv_heads, self.head_dim, k_cache.view(-1, *k_cache.shape[2:]),
                                    v_cache.view(-1, *v_cache.shape[2:]), meta.slot_mapping)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(-1, self.num_heads, self.head_dim)                 # [T, H, D]
        k = k.view(-1, self.num_kv_heads, self.head_dim)              # [T, KVH, D]
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        if not fused:
            if self.q_norm is not None:
                q, k = self.q_norm(q), self.k_norm(k)
            q, k = self.rotary(positions, q, k)
            self.attn.store_kv(k, v, k_cache, v_cache, meta)
        out = self.attn(q, k, v, k_cache, v_cache, meta)              # [T, H·D]
        return self.o_proj(out)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig, tp: TPGroup):
        super().__init__()
        self.gate_up_proj = MergedColumnParallelLinear(cfg.hidden_size, [cfg.intermediate_size] * 2,
                                                       cfg.mlp_bias, tp)
        self.down_proj = RowParallelLinear(cfg.intermediate_size, cfg.hidden_size, cfg.mlp_bias, tp)
        self.act = SiluAndMul()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_up_proj(x)))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, tp: TPGroup, rotary: RotaryEmbedding):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, tp, rotary)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg, tp)

    def forward(self, positions, hidden, residual, k_cache, v_cache, meta) -> tuple[torch.Tensor, torch.Tensor]:
        # hidden [T, hidden_size]: the previous layer's output, not yet added to the residual stream (None before
        # the first layer); the add is folded into this layer's first norm. -> (this layer's output, residual)
        if residual is None:
            residual, hidden = hidden, self.input_layernorm(hidden)
        else:
            hidden, residual = self.input_layernorm(hidden, residual)
        hidden = self.self_attn(positions, hidden, k_cache, v_cache, meta)
        hidden, residual = self.post_attention_layernorm(hidden, residual)
        return self.mlp(hidden), residual


class DecoderModel(nn.Module):
    def __init__(self, cfg: ModelConfig, tp: TPGroup, max_positions: int, dtype: torch.dtype):
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size, tp)
        rotary = RotaryEmbedding(cfg.head_dim, max_positions, cfg.rope, dtype)
        self.layers = nn.ModuleList(DecoderLayer(cfg, tp, rotary) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


HEAD_METHOD = {"int8": "int8", "int4": "int8"}     # the LM head's quantization under each method


class LlamaFamilyForCausalLM(nn.Module):
    # checkpoint name fragment -> (our fused parameter's fragment, shard id)
    packed_modules_mapping = {
        "q_proj": ("qkv_proj", "q"),
        "k_proj": ("qkv_proj", "k"),
        "v_proj": ("qkv_proj", "v"),
        "gate_proj": ("gate_up_proj", 0),
        "up_proj": ("gate_up_proj", 1),
    }

    def __init__(self, cfg: ModelConfig, tp: TPGroup, max_positions: int, dtype: torch.dtype):
        super().__init__()
        self.config = cfg
        self.model = DecoderModel(cfg, tp, max_positions, dtype)
        self.lm_head = ParallelLMHead(cfg.vocab_size, cfg.hidden_size, tp)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.flat: FlatDecoder | None = None      # the layers as one loop of kernel calls (`flatten`)

    def flatten(self, device: torch.device) -> str:
        """Run decode and verify passes through the layers as one flat loop of kernel calls where the kernels serve
        the whole model (common/models/flat_decoder.py): after quantizing, prepacking and batch-invariant mode, which
        choose the kernels. -> "" when on, else why not."""
        self.flat, reason = FlatDecoder.of(self.model, self.model.norm.weight.dtype, device)
        return reason

    def quantize_weights(self, method: str, gguf=None, head: str | None = None) -> None:
        """Quantize every matmul's weights (common/layers/quantization.py; on the VNNI kernel the activations go
        to int8 inside each matmul, on PyTorch's they stay in the model's dtype). Under int4 the LM head is
        int8 (as llama.cpp's Q4_K_M keeps its output tensor at 6 bits): the logits the sampler sees matter most.
        `gguf` (common/models/gguf_weights.GgufCodes): under int4, its Q4_K tensors' own codes are used. `head`: the
        LM head's method instead of that default (a draft's int4 head)."""
        from common.models.gguf_weights import check_matches
        for name, module in self.named_modules():
            if module is self or not hasattr(module, "quantize"):
                continue
            layer_method = (head or HEAD_METHOD[method]) if module is self.lm_head else method
            exact = gguf.rows_for(name, module, module.tp.rank) if gguf is not None and layer_method == "int4" else []
            for rows in exact:
                check_matches(rows, module.weight.data, f"{gguf.path.name}: {name}")
            module.quantize(layer_method, name, exact)
        self._drop_untied_head()

    def prepack_cpu_weights(self) -> None:
        """Pack every matmul weight for oneDNN (CPU only; see common/layers/cpu_gemm.py)."""
        for module in self.modules():
            if module is not self and hasattr(module, "prepack"):
                module.prepack()
        self._drop_untied_head()

    def _drop_untied_head(self) -> None:
        head = self.lm_head
        if not self.config.tie_word_embeddings and (head.packed_weight is not None or head.qweight is not None):
            head.weight.data = torch.empty(0, dtype=head.weight.dtype)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
                meta: AttentionMetadata, logits_index: torch.Tensor) -> torch.Tensor:
        # input_ids, positions [T]; logits_index [N] rows of T whose next-token logits are wanted -> [N, vocab]
        hidden = self.model.embed_tokens(input_ids)                   # [T, hidden]
        if self.flat is not None and self.flat.serves(meta):
            hidden, residual = self.flat(positions, hidden, kv_caches, meta)
        else:
            residual = None
            for layer, (k_cache, v_cache) in zip(self.model.layers, kv_caches):
                hidden, residual = layer(positions, hidden, residual, k_cache, v_cache, meta)
        # the norm is per token: only the rows we need (index_select copies, so the in-place add is safe)
        hidden, _ = self.model.norm(hidden.index_select(0, logits_index), residual.index_select(0, logits_index))
        return self.lm_head(hidden)
