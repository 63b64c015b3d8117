"""The VNNI kernel against a float reference of what it computes (int8 activations per row and group of 32 times
the dequantized weight), row by row independent of the rest of the call, over the shapes decoding uses."""
from pathlib import Path

import pytest
import torch

from common.kernels import vnni_gemm

# The kernel must build and run wherever the processor has AVX-512 VNNI (this machine and CI's): a failed build
# fails here. Only a processor without the instructions skips the kernel's own tests.
HAS_VNNI = "avx512_vnni" in Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else False
pytestmark = pytest.mark.skipif(not HAS_VNNI, reason="the processor lacks AVX-512 VNNI")



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
