"""int8/int4 on both kernels (PyTorch's weight-only ones and our VNNI one): the codes round to within half a step,
the kernels compute with exactly those weights, shards quantize as slices of the whole, and shapes the kernels
cannot take are refused by name. The VNNI kernel's own arithmetic is tested in tests/common/kernels."""
import pytest
import torch

from common.errors import ConfigError
from common.kernels import vnni_gemm
from common.layers.quantization import (INT4_GROUP, Int4Weight, Int8Weight, check_shard, dequantize,
                                        int4_from_codes, kernel_of, numerics_of, quantize, quantize_shard)

from tests.common.kernels.test_vnni_gemm import HAS_AVX2, quantized_activations

# Where the processor has AVX-512 VNNI (this machine, CI's) a failed build of the kernel fails here, never
# falls back silently; elsewhere only PyTorch's kernels are tested.
KERNELS = ["torch", "vnni"] if HAS_AVX2 else ["torch"]


def _weight(out=64, inp=128, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, inp, generator=g) * torch.rand(out, 1, generator=g)    # rows of different spread
    w[3, :INT4_GROUP] = 0.25                                                    # a constant group: zero spread
    return w.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_rounds_each_weight_to_within_half_a_step_of_its_row_scale(dtype):
    w = _weight(dtype=dtype)
    qw = quantize(w, "int8", kernel="torch")
    assert isinstance(qw, Int8Weight) and qw.q.dtype == torch.int8 and qw.scales.dtype == dtype
    step = qw.scales.float()[:, None]                                           # [out, 1]
    err = (dequantize(qw) - w.float()).abs()
    assert (err <= step / 2 * (1 + 1e-3)).all()
    assert qw.nbytes == w.numel() + w.shape[0] * w.element_size()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int4_rounds_each_weight_to_within_half_a_step_of_its_group_scale(dtype):
    w = _weight(dtype=dtype)
    qw = quantize(w, "int4", kernel="torch")
    assert isinstance(qw, Int4Weight) and qw.scales_and_zeros.shape == (128 // INT4_GROUP, 64, 2)
    step = qw.scales_and_zeros[..., 0].float().T.repeat_interleave(INT4_GROUP, dim=1)    # [out, in]
    err = (dequantize(qw) - w.float()).abs()
    # bf16 scales and zeros round the grid itself by up to 2^-8 of the group's spread
    slack = 1e-3 if dtype == torch.float32 else 0.1
    assert (err <= step * (0.5 + slack)).all()
    assert err[3, :INT4_GROUP].max() == 0                                       # the constant group is exact
    assert qw.nbytes == w.numel() // 2 + (128 // INT4_GROUP) * 64 * 2 * w.element_size()   # 4 bits + scale, zero


@pytest.mark.skipif(not HAS_AVX2, reason="the processor lacks AVX2")
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("inp", [128, 96, 32])
def test_vnni_codes_round_to_within_half_a_step_and_nothing_clips(bits, inp):
    w = _weight(inp=inp)
    qw = quantize(w, "int4" if bits == 4 else "int8", kernel="vnni")
    assert isinstance(qw, vnni_gemm.VnniWeight) and qw.bits == bits and qw.in_features == inp
    gc = vnni_gemm.unpack(qw)
    step = (gc.d.float() * gc.sc.float()).repeat_interleave(INT4_GROUP, 1)[:, :inp]        # [out, in]
    err = (dequantize(qw) - w).abs()
    assert (err <= step / 2 * (1 + 1e-3) + 1e-7).all()
    assert qw.nbytes == 64 * inp * (bits + 8 * 2 / 32) / 8 + 64 * inp // (32 * qw.groups_per_superblock) * 2 * 2


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("method", ["int8", "int4"])
@pytest.mark.parametrize("rows", [1, 2, 5, 9])
def test_the_kernel_multiplies_by_the_dequantized_weight(kernel, method, rows):
    w = _weight(out=96, inp=64, seed=1)
    qw = quantize(w, method, kernel=kernel)
    x = torch.randn(rows, 64, generator=torch.Generator().manual_seed(rows))
    if kernel == "vnni":        # activations go to int8 per row and group of 32, as the kernel does
        x_seen = quantized_activations(x)
        torch.testing.assert_close(qw.matmul(x), x_seen @ dequantize(qw).T, rtol=1e-5, atol=1e-5)
        assert (qw.matmul(x) - x @ dequantize(qw).T).abs().max() < 0.02 * (x @ dequantize(qw).T).abs().max()
    else:
        torch.testing.assert_close(qw.matmul(x), x @ dequantize(qw).T, rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(not HAS_AVX2, reason="the processor lacks AVX2")
def test_this_processor_runs_the_vnni_kernel_and_the_numerics_name_it():
    assert vnni_gemm.available(), vnni_gemm.unavailable_reason()
    assert kernel_of("int4") == "vnni" and numerics_of("int4") == "int4/vnni" and numerics_of("none") == "none"
    assert isinstance(quantize(_weight(), "int4"), vnni_gemm.VnniWeight)      # the default where it runs


def test_int4_from_codes_reproduces_codes_times_scale_plus_offset():
    g = torch.Generator().manual_seed(2)
    codes = torch.randint(0, 16, (32, 64), generator=g, dtype=torch.int32)
    scale = torch.rand(32, 2, generator=g) + 0.1                               # [out, groups]
    offset = -torch.rand(32, 2, generator=g)
    qw = int4_from_codes(codes, scale, offset, torch.float32)
    expected = codes.float() * scale.repeat_interleave(INT4_GROUP, 1) + offset.repeat_interleave(INT4_GROUP, 1)
    torch.testing.assert_close(dequantize(qw), expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("method", ["int8", "int4"])
def test_a_column_parallel_shard_quantizes_as_the_rows_of_the_whole(kernel, method):
    w = _weight(out=64, inp=64, seed=3)
    whole = dequantize(quantize(w, method, kernel=kernel))
    for rank in range(2):
        rows = slice(rank * 32, (rank + 1) * 32)
        assert torch.equal(dequantize(quantize(w[rows], method, kernel=kernel)), whole[rows])


def test_a_row_parallel_int4_shard_quantizes_as_the_columns_of_the_whole():
    # groups run along the input columns and never straddle a shard's edge (PyTorch's layout: one scale per group)
    w = _weight(out=32, inp=128, seed=4)
    whole = dequantize(quantize(w, "int4", kernel="torch"))
    for rank in range(2):
        cols = slice(rank * 64, (rank + 1) * 64)
        assert torch.equal(dequantize(quantize(w[:, cols].contiguous(), "int4", kernel="torch")), whole[:, cols])


def test_shapes_the_kernels_cannot_take_are_refused_by_name():
    with pytest.raises(ConfigError, match=r"mlp.down_proj has 48 input columns per rank.*group size 32"):
        check_shard("int4", 64, 48, "mlp.down_proj")
    with pytest.raises(ConfigError, match=r"mlp.down_proj has 48 input columns per rank.*group size 32"):
        check_shard("int8", 64, 48, "mlp.down_proj")                           # the VNNI kernel groups int8 too
    with pytest.raises(ConfigError, match=r"self_attn.qkv_proj has 24 output rows per rank.*multiple of 16"):
        quantize_shard(torch.zeros(24, 64), "int4", "self_attn.qkv_proj")
    with pytest.raises(ConfigError, match="quantization='int3'"):
        quantize(torch.zeros(16, 32), "int3")
    with pytest.raises(ConfigError, match="kernel='avx'"):
        quantize(torch.zeros(16, 32), "int4", kernel="avx")
