"""The VNNI kernel against a float reference of what it computes (int8 activations per row and group of 32 times
the dequantized weight), row by row independent of the rest of the call, over the shapes decoding uses."""
from pathlib import Path

import pytest
import torch

from common.kernels import vnni_gemm
from tests.common.kernels.isa_paths import isa_paths, on_path

# The kernel must build and run wherever the processor has AVX2 (AVX-512 VNNI or not): a failed build fails here.
# Only a processor without the instructions skips the kernel's own tests.
HAS_AVX2 = "avx2" in Path("/proc/cpuinfo").read_text().split() if Path("/proc/cpuinfo").exists() else False
pytestmark = pytest.mark.skipif(not HAS_AVX2, reason="the processor lacks AVX2")



def quantized_activations(x: torch.Tensor) -> torch.Tensor:
    """x [M, K] as the kernel sees it: int8 per row and group of 32, scale max|x| / 127."""
    m, k = x.shape
    xg = x.float().reshape(m, k // vnni_gemm.GROUP, vnni_gemm.GROUP)
    xs = xg.abs().amax(-1, keepdim=True) / 127
    return torch.where(xs > 0, (xg / torch.where(xs > 0, xs, 1)).round() * xs, 0).reshape(m, k)


def _reference(x: torch.Tensor, gc: vnni_gemm.GroupCodes) -> torch.Tensor:
    return quantized_activations(x).double() @ gc.dequantized().double().T          # [M, N]


def test_the_kernel_builds_and_runs_here():
    assert vnni_gemm.available(), vnni_gemm.unavailable_reason()


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("n,k", [(64, 256), (48, 896), (32, 4480), (16, 32), (32, 96)])  # G = 8, 4, 4, 1, 1
def test_the_kernel_computes_quantized_activations_times_the_dequantized_weight(bits, n, k):
    g = torch.Generator().manual_seed(n + k)
    w = torch.randn(n, k, generator=g) * 0.05
    gc = vnni_gemm.quantize_groups(w, bits)
    qw = vnni_gemm.pack(gc)
    for rows in (1, 2, 3, 4, 5, 9, 17):
        x = torch.randn(rows, k, generator=g)
        ref = _reference(x, gc)
        torch.testing.assert_close(qw.matmul(x).double(), ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())


@pytest.mark.parametrize("bits", [4, 8])
def test_a_row_gets_the_same_bits_whatever_shares_its_call(bits):
    g = torch.Generator().manual_seed(1)
    qw = vnni_gemm.pack(vnni_gemm.quantize_groups(torch.randn(64, 512, generator=g), bits))
    x = torch.randn(17, 512, generator=g).to(torch.bfloat16)
    alone = torch.cat([qw.matmul(x[i:i + 1]) for i in range(17)])
    for m in (2, 3, 5, 7, 8, 9, 13, 16, 17):                    # passes of 8 rows and every remainder
        assert torch.equal(qw.matmul(x[:m]), alone[:m])


def test_pack_and_unpack_are_inverse_and_bytes_are_as_documented():
    g = torch.Generator().manual_seed(2)
    for bits in (4, 8):
        gc = vnni_gemm.quantize_groups(torch.randn(32, 1536, generator=g), bits)
        qw = vnni_gemm.pack(gc)
        back = vnni_gemm.unpack(qw)
        assert all(torch.equal(getattr(gc, f), getattr(back, f)) for f in ("codes", "sc", "mn", "d", "dmin"))
        assert qw.groups_per_superblock == 8
        assert qw.nbytes * 8 / (32 * 1536) == bits + 0.5 + 2 * 16 / 256             # 4.625 and 8.625 bits


def test_all_zero_rows_and_activations_give_zeros():
    qw = vnni_gemm.pack(vnni_gemm.quantize_groups(torch.zeros(16, 64), 4))
    assert torch.equal(qw.matmul(torch.randn(3, 64)), torch.zeros(3, 16))
    qw = vnni_gemm.pack(vnni_gemm.quantize_groups(torch.randn(16, 64), 4))
    assert torch.equal(qw.matmul(torch.zeros(2, 64)), torch.zeros(2, 16))


def test_the_kernel_refuses_a_mismatched_input_by_its_shape():
    qw = vnni_gemm.pack(vnni_gemm.quantize_groups(torch.randn(16, 64), 4))
    with pytest.raises(RuntimeError, match="K=128"):
        qw.matmul(torch.randn(1, 128))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float16])
def test_bf16_is_read_and_written_as_it_is_and_the_bias_is_added_as_torch_adds_it(dtype):
    # bf16 in and out directly: the same bits as going through fp32; the fused bias: the same bits as `y + bias`
    g = torch.Generator().manual_seed(3)
    qw = vnni_gemm.pack(vnni_gemm.quantize_groups(torch.randn(48, 256, generator=g) * 0.05, 4))
    x = torch.randn(5, 256, generator=g).to(dtype)
    bias = torch.randn(48, generator=g).to(dtype)
    y = qw.matmul(x)
    assert y.dtype == dtype
    assert torch.equal(y, qw.matmul(x.float()).to(dtype))
    assert torch.equal(qw.matmul(x, bias), y + bias)


def test_a_bias_of_the_wrong_size_is_refused_by_its_size():
    qw = vnni_gemm.pack(vnni_gemm.quantize_groups(torch.randn(16, 64), 4))
    with pytest.raises(RuntimeError, match=r"bias must be \[16\]"):
        qw.matmul(torch.randn(1, 64), torch.zeros(32))


def _exact(x: torch.Tensor, gc: vnni_gemm.GroupCodes, bias: torch.Tensor | None = None) -> torch.Tensor:
    """What the kernel computes, operation by operation in float32 (the fused multiply-adds as one rounding of the
    float64 result: a float32 product is exact in float64, the sum is too unless the two are ~2^30 apart, and a
    double rounding needs a float64 result on a float32 halfway point): the bits both instruction paths must give."""
    f32 = torch.float32
    m, k = x.shape
    ng = k // vnni_gemm.GROUP
    xg = x.to(f32).reshape(m, ng, vnni_gemm.GROUP)
    a = xg.abs().amax(-1)                                                          # [M, groups]
    xs = torch.where(a > 0, a / 127, 0)
    inv = torch.where(a > 0, torch.full_like(a, 127) / torch.where(a > 0, a, 1), 0)   # not `127 / a`: torch
    # computes a scalar over a tensor as reciprocal(a) * 127, two roundings
    xq = (xg * inv[..., None]).round().clamp(-127, 127)                            # [M, groups, 32]
    bx = xs * xq.sum(-1)
    codes = gc.codes.reshape(gc.codes.shape[0], ng, vnni_gemm.GROUP).double()       # [N, groups, 32]
    dots = torch.einsum("mgc,ngc->mng", xq.double(), codes).to(f32)                 # exact integers
    step = gc.d.to(f32) * gc.sc.to(f32)                                            # [N, groups]
    low = gc.dmin.to(f32) * gc.mn.to(f32)
    acc = torch.zeros(m, codes.shape[0], dtype=f32)
    for g in range(ng):
        scaled = dots[:, :, g] * xs[:, g:g + 1]
        acc = (scaled.double() * step[:, g].double() + acc.double()).to(f32)
        acc = (acc.double() - low[:, g].double() * bx[:, g:g + 1].double()).to(f32)
    if bias is not None:
        return (acc.to(x.dtype).to(f32) + bias.to(f32)).to(x.dtype)
    return acc.to(x.dtype)


@pytest.fixture(params=isa_paths(vnni_gemm) if HAS_AVX2 else ["native"])
def path(request):
    with on_path(vnni_gemm, request.param):
        yield request.param


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_every_instruction_path_gives_the_exact_bits_of_one_reference(path, bits, dtype):
    # AVX-512 VNNI and AVX2 must compute the same numbers: the kernel's numerics ("int4/vnni") name no ISA, so a
    # prefix cache or a multi-node group may mix processors. Each path this processor runs meets one exact reference.
    g = torch.Generator().manual_seed(bits)
    for n, k in ((48, 896), (32, 512), (16, 96)):
        gc = vnni_gemm.quantize_groups(torch.randn(n, k, generator=g) * 0.05, bits)
        qw = vnni_gemm.pack(gc)
        bias = torch.randn(n, generator=g).to(dtype)
        for rows in range(1, 10):                       # every pass size the paths have, and their remainders
            x = torch.randn(rows, k, generator=g).to(dtype)
            assert torch.equal(qw.matmul(x), _exact(x, gc)), (path, n, k, rows)
            assert torch.equal(qw.matmul(x, bias), _exact(x, gc, bias)), (path, n, k, rows, "bias")


def test_the_path_is_reported_and_an_extreme_group_does_not_overflow(path):
    # The AVX2 path adds a group's products in int16: codes at their top (15 or 255) times activations at +-127 in
    # every column are the largest sums it meets.
    has_vnni = "avx512_vnni" in Path("/proc/cpuinfo").read_text().split()
    assert vnni_gemm.isa() == ("avx512_vnni" if has_vnni and path == "native" else "avx2")
    for bits in (4, 8):
        top = (1 << bits) - 1
        gc = vnni_gemm.GroupCodes(torch.full((16, 64), top, dtype=torch.uint8), torch.ones(16, 2, dtype=torch.uint8),
                                  torch.zeros(16, 2, dtype=torch.uint8), torch.ones(16, 2, dtype=torch.float16),
                                  torch.zeros(16, 2, dtype=torch.float16), bits)
        qw = vnni_gemm.pack(gc)
        x = torch.tensor([[1.0] * 64, [-1.0] * 64])
        assert torch.equal(qw.matmul(x), torch.tensor([[64.0 * top * 127] * 16, [-64.0 * top * 127] * 16]) / 127)
