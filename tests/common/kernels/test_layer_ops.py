"""specd's layer ops against the PyTorch chains they replace: RoPE and the cache write bit for bit, RMSNorm and
the SiLU gate to the last bit of their fp32 sum / exp, every row the same alone as in a batch, and a model's
logits the same either way to rounding."""
import pytest
import torch
import torch.nn.functional as F

from common.config import RopeConfig
from common.kernels import layer_ops
from common.layers.rotary import RotaryEmbedding
from tests.common.kernels.isa_paths import isa_paths, on_path
from tests.common.kernels.test_vnni_gemm import HAS_AVX2

pytestmark = pytest.mark.skipif(not HAS_AVX2, reason="the processor lacks AVX2")
DTYPES = [torch.bfloat16, torch.float32]
PATHS = isa_paths(layer_ops) if HAS_AVX2 else ["native"]


@pytest.fixture(autouse=True, params=PATHS)
def path(request):
    """Every test on every instruction path this processor runs (AVX-512 and AVX2 where it has both)."""
    with on_path(layer_ops, request.param):
        yield request.param


def _torch_rms_norm(x, w, eps):
    x32 = x.float()
    return w * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def test_the_kernels_build_and_run_here():
    assert layer_ops.available(), layer_ops.unavailable_reason()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [1536, 896, 40])             # 40: a row that is not whole 16-lane vectors
def test_rms_norm_with_and_without_the_residual_add(dtype, n):
    g = torch.Generator().manual_seed(n)
    x = (torch.randn(7, n, generator=g) * 3).to(dtype)
    res = torch.randn(7, n, generator=g).to(dtype)
    w = torch.rand(n, generator=g).to(dtype)
    plain = layer_ops.rms_norm(x, w, 1e-6)
    summed = res.clone()
    fused = layer_ops.rms_norm(x, w, 1e-6, summed)
    assert torch.equal(summed, x + res)                    # the add is torch's, written into the residual
    for out, ref in ((plain, _torch_rms_norm(x, w, 1e-6)), (fused, _torch_rms_norm(x + res, w, 1e-6))):
        assert out.dtype == dtype and out.shape == ref.shape
        torch.testing.assert_close(out.float(), ref.float(), rtol=2 * torch.finfo(dtype).eps, atol=1e-6)
        if dtype == torch.bfloat16:                        # the sum's order moves a few values by one step
            assert (out != ref).float().mean() < 0.05      # (in fp32, a row's factor moves the whole row by an ulp)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads,kv_heads,head_dim", [(12, 2, 128), (14, 2, 64), (4, 2, 16), (3, 1, 8)])
def test_rope_and_the_cache_write_equal_torch_bit_for_bit(dtype, heads, kv_heads, head_dim):
    g = torch.Generator().manual_seed(heads * head_dim)
    rot = RotaryEmbedding(head_dim, 4096, RopeConfig(), dtype)
    t = 5
    qkv = torch.randn(t, (heads + 2 * kv_heads) * head_dim, generator=g).to(dtype)
    pos = torch.tensor([0, 1, 77, 2048, 4095])
    slots = torch.tensor([9, 3, 0, 31, 17])
    q, k, v = qkv.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], -1)
    ref_q, ref_k = rot(pos, q.reshape(t, heads, head_dim), k.reshape(t, kv_heads, head_dim))
    k_cache = torch.full((32, kv_heads, head_dim), 7.0, dtype=dtype)
    v_cache = k_cache.clone()
    out = qkv.clone()
    layer_ops.rope_store_kv(out, pos, rot.cos, rot.sin, heads, kv_heads, head_dim, k_cache, v_cache, slots)
    assert torch.equal(out[:, :heads * head_dim].reshape(t, heads, head_dim), ref_q)
    assert torch.equal(out[:, heads * head_dim:(heads + kv_heads) * head_dim].reshape(t, kv_heads, head_dim), ref_k)
    assert torch.equal(out[:, (heads + kv_heads) * head_dim:], v)                        # v is not rotated
    assert torch.equal(k_cache[slots], ref_k) and torch.equal(v_cache[slots], v.reshape(t, kv_heads, head_dim))
    untouched = torch.ones(32, dtype=torch.bool)
    untouched[slots] = False
    assert bool((k_cache[untouched] == 7).all()) and bool((v_cache[untouched] == 7).all())


def test_rope_refuses_a_position_past_its_table_and_a_slot_past_the_cache():
    rot = RotaryEmbedding(16, 64, RopeConfig(), torch.float32)
    qkv = torch.randn(1, 4 * 16)
    cache = torch.zeros(8, 1, 16)
    with pytest.raises(RuntimeError, match="position 64 outside the table's 64"):
        layer_ops.rope_store_kv(qkv, torch.tensor([64]), rot.cos, rot.sin, 2, 1, 16, cache, cache.clone(),
                                torch.tensor([0]))
    with pytest.raises(RuntimeError, match="slot 8 outside the cache's 8"):
        layer_ops.rope_store_kv(qkv, torch.tensor([3]), rot.cos, rot.sin, 2, 1, 16, cache, cache.clone(),
                                torch.tensor([8]))


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_mul_equals_torch_to_its_exp(dtype):
    g = torch.Generator().manual_seed(5)
    x = (torch.randn(3, 2 * 8960 + 2 * 24, generator=g) * 4).to(dtype)   # 8984 per half: a partial vector
    gate, up = x.chunk(2, dim=-1)
    ref = F.silu(gate) * up
    out = layer_ops.silu_mul(x)
    torch.testing.assert_close(out.float(), ref.float(), rtol=4 * torch.finfo(dtype).eps, atol=1e-6)
    assert (out != ref).float().mean() < 0.15


def test_every_row_is_the_same_bits_alone_as_in_a_batch():
    g = torch.Generator().manual_seed(6)
    x = torch.randn(9, 1536, generator=g).to(torch.bfloat16)
    res = torch.randn(9, 1536, generator=g).to(torch.bfloat16)
    w = torch.rand(1536, generator=g).to(torch.bfloat16)
    batch = layer_ops.rms_norm(x, w, 1e-6, res.clone())
    alone = torch.cat([layer_ops.rms_norm(x[i:i + 1], w, 1e-6, res[i:i + 1].clone()) for i in range(9)])
    assert torch.equal(batch, alone)
    gu = torch.randn(9, 2 * 512, generator=g).to(torch.bfloat16)
    assert torch.equal(layer_ops.silu_mul(gu), torch.cat([layer_ops.silu_mul(gu[i:i + 1]) for i in range(9)]))


def test_the_kernels_refuse_what_they_do_not_compute_by_name():
    with pytest.raises(RuntimeError, match="silu_mul: float32 or bfloat16, got Half"):
        layer_ops.silu_mul(torch.zeros(2, 8, dtype=torch.float16))
    with pytest.raises(RuntimeError, match=r"rms_norm: weight must be \[8\]"):
        layer_ops.rms_norm(torch.zeros(2, 8), torch.ones(4), 1e-6)
    with pytest.raises(RuntimeError, match="contiguous"):
        layer_ops.rms_norm(torch.zeros(8, 2).T, torch.ones(8), 1e-6)


@pytest.mark.parametrize("dtype", DTYPES)
def test_every_instruction_path_gives_the_same_bits(dtype):
    # AVX-512 and AVX2 run the same operations lane for lane (the norm's sum of squares in the 16-lane order): a
    # model's numbers must not depend on which one its processor has.
    g = torch.Generator().manual_seed(11)
    x, r = torch.randn(3, 1544, generator=g).to(dtype), torch.randn(3, 1544, generator=g).to(dtype)
    w, gate_up = torch.randn(1544, generator=g).to(dtype), torch.randn(3, 2 * 904, generator=g).to(dtype)
    outs = []
    for p in PATHS:
        with on_path(layer_ops, p):
            residual = r.clone()
            outs.append((layer_ops.rms_norm(x, w, 1e-6, residual), residual, layer_ops.silu_mul(gate_up)))
    assert all(torch.equal(a, b) for o in outs[1:] for a, b in zip(outs[0], o))
    torch.testing.assert_close(outs[0][0].float(), _torch_rms_norm(x + r, w, 1e-6).float(), rtol=1e-2, atol=1e-2)
