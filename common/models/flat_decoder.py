"""A decode or verify pass through the decoder layers as one flat loop of kernel calls (CPU).

Why: at decode a layer's tensors are one row, and what the layers' own forward costs beyond its kernels is Python:
nn.Module dispatch, each layer's check of which kernel serves it, splits and views: a step of the 0.5B draft made
~3,700 Python calls. This loop makes the same kernel calls in the same order with the same arguments, about seven per
layer, so its numbers are the layers' bit for bit (tests/common/models/test_flat_decoder.py). Measured A/B in one
process (int4, bf16, 2 threads, 100 tokens of context, medians of 12 runs of 12 steps): a 0.5B draft step 12.9 ->
10.8 ms, a 1.5B target step 28.3 -> 25.6 ms.

It serves a model whose every layer op runs specd's CPU kernels (common/kernels: the layer ops, the row
attention), i.e. a CPU model in fp32 or bf16 without per-head q/k norms, and passes that read the KV cache
(decode, verify, a draft's catch-up; a prefill takes the layers' forward). A matmul goes straight to the VNNI
kernel where nothing wraps it (one rank, no row padding); any other (oneDNN's bf16, TP's all-reduce) runs its
layer's own forward.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from common.kernels import layer_ops, row_attention, vnni_gemm
from common.layers.attention import AttentionMetadata
from common.layers.batch_invariant import row_kernel_runs
from common.layers.linear import RowParallelLinear

Matmul = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True, slots=True)
class LayerCalls:
    """One decoder layer's weights and matmuls, unpacked once."""
    input_norm: torch.Tensor        # [hidden]
    qkv: Matmul                     # [T, hidden] -> [T, (H + 2·KVH)·D], bias included
    o: Matmul                       # [T, H·D] -> [T, hidden]
    post_norm: torch.Tensor         # [hidden]
    gate_up: Matmul                 # [T, hidden] -> [T, 2·I]
    down: Matmul                    # [T, I] -> [T, hidden]


class FlatDecoder:
    def __init__(self, model, layers: list[LayerCalls]):
        first = model.layers[0]
        attn = first.self_attn
        self.layers = layers
        self.eps = first.input_layernorm.eps
        self.num_heads, self.num_kv_heads, self.head_dim = attn.num_heads, attn.num_kv_heads, attn.head_dim
        self.q_size, self.scale = attn.q_size, attn.attn.scale
        self.cos, self.sin = attn.rotary.cos, attn.rotary.sin

    @classmethod
    def of(cls, model, dtype: torch.dtype, device: torch.device) -> tuple[FlatDecoder | None, str]:
        """(the flat loop of `model` (a DecoderModel), "") where the kernels serve all of it, else (None, why)."""
        if device.type != "cpu" or dtype not in (torch.float32, torch.bfloat16):
            return None, f"the kernels run on CPU in fp32 or bf16 (here {device.type}, {dtype})"
        probe = torch.empty(0, dtype=dtype, device=device)     # asked as the layers ask, tensor by tensor
        if not layer_ops.runs(probe):
            return None, f"the layer ops are off ({layer_ops.unavailable_reason() or layer_ops.ENV + '=torch'})"
        if not row_kernel_runs(probe):
            return None, f"the row attention kernel is unavailable ({row_attention.unavailable_reason()})"
        layers = list(model.layers)
        if any(layer.self_attn.q_norm is not None for layer in layers):
            return None, "the model has per-head q/k norms (its RoPE runs in PyTorch)"
        norms = [n for layer in layers for n in (layer.input_layernorm, layer.post_attention_layernorm)]
        if any(n.weight.dtype != dtype for n in norms):
            return None, "the norms' weights are not in the activations' dtype"
        if any(n.eps != norms[0].eps for n in norms):
            return None, "the norms' epsilons differ"
        return cls(model, [LayerCalls(layer.input_layernorm.weight, _matmul(layer.self_attn.qkv_proj),
                                      _matmul(layer.self_attn.o_proj), layer.post_attention_layernorm.weight,
                                      _matmul(layer.mlp.gate_up_proj), _matmul(layer.mlp.down_proj))
                          for layer in layers]), ""

    @staticmethod
    def serves(meta: AttentionMetadata) -> bool:
        """Passes that read the cache through the row kernel (the layers take a prefill to torch's flash kernel)."""
        return not meta.is_causal_prefill and meta.q_pos is not None

    def __call__(self, positions: torch.Tensor, hidden: torch.Tensor, kv_caches, meta: AttentionMetadata
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """hidden [T, hidden] embedded tokens -> (the last layer's output, the residual stream), as the layers'
        loop returns them."""
        rms_norm, rope_store_kv, silu_mul = layer_ops.rms_norm, layer_ops.rope_store_kv, layer_ops.silu_mul
        attend = row_attention.row_attention
        h, kvh, d, eps = self.num_heads, self.num_kv_heads, self.head_dim, self.eps
        b, mq, index = meta.num_seqs, meta.max_q, meta.query_index
        residual = None
        for layer, (k_cache, v_cache) in zip(self.layers, kv_caches):
            if residual is None:
                residual, x = hidden, rms_norm(hidden, layer.input_norm, eps)
            else:
                x = rms_norm(hidden, layer.input_norm, eps, residual)          # residual += hidden, in place
            qkv = layer.qkv(x)                                                   # [T, (H + 2·KVH)·D]
            k_flat, v_flat = k_cache.view(-1, kvh, d), v_cache.view(-1, kvh, d)  # [slots, KVH, D]
            rope_store_kv(qkv, positions, self.cos, self.sin, h, kvh, d, k_flat, v_flat, meta.slot_mapping)
            q = qkv[:, :self.q_size].view(-1, h, d)                              # [T, H, D]
            if index is None:
                q_pad = q.view(b, mq, h, d)
            else:
                q_pad = q.new_zeros(b * mq, h, d)
                q_pad[index] = q
                q_pad = q_pad.view(b, mq, h, d)
            out = attend(q_pad, k_flat, v_flat, meta.context_slots, meta.q_pos, self.scale).reshape(b * mq, -1)
            x = rms_norm(layer.o(out if index is None else out[index]), layer.post_norm, eps, residual)
            hidden = layer.down(silu_mul(layer.gate_up(x)))
        return hidden, residual


def _matmul(module) -> Matmul:
    """The VNNI kernel's call with the weight bound where the layer's forward would add nothing to it; else the
    layer's forward (without nn.Module's dispatch)."""
    w = getattr(module, "qweight", None)
    if (isinstance(w, vnni_gemm.VnniWeight) and module.tp.world_size == 1 and module.row_tile in (None, 1)
            and not (isinstance(module, RowParallelLinear) and module.bias is not None)):
        mm = vnni_gemm._extension()[0].vnni_mm
        args = (w.codes, w.sc, w.mn, w.d, w.dmin, w.groups_per_superblock, w.bits)
        bias = None if isinstance(module, RowParallelLinear) else module.bias      # a column layer fuses its bias
        return lambda x: mm(x, *args, bias)
    return module.forward
