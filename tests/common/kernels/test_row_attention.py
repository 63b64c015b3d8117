"""The row attention kernel against a float64 softmax reference, over scattered cache slots and grouped heads, and
every row the same bits alone as in its call."""
import pytest
import torch

from common.kernels import row_attention as ra
from tests.common.kernels.isa_paths import isa_paths, on_path
from tests.common.kernels.test_vnni_gemm import HAS_AVX2

pytestmark = pytest.mark.skipif(not HAS_AVX2, reason="the processor lacks AVX2")
PATHS = isa_paths(ra) if HAS_AVX2 else ["native"]


@pytest.fixture(autouse=True, params=PATHS)
def path(request):
    """Every test on every instruction path this processor runs (AVX-512 and AVX2 where it has both)."""
    with on_path(ra, request.param):
        yield request.param


def _case(dtype, seed=0, heads=12, kv_heads=2, head_dim=128, ctx=(300, 650), q_len=5):
    g = torch.Generator().manual_seed(seed)
    num_slots = 700
    k = torch.randn(num_slots, kv_heads, head_dim, generator=g).to(dtype)
    v = torch.randn(num_slots, kv_heads, head_dim, generator=g).to(dtype)
    slots = torch.zeros(len(ctx), 1024, dtype=torch.long)                   # padded past the context
    for b, c in enumerate(ctx):
        slots[b, :c] = torch.randperm(num_slots, generator=g)[:c]
    q = torch.randn(len(ctx), q_len, heads, head_dim, generator=g).to(dtype)
    q_pos = torch.tensor([[c - q_len + j for j in range(q_len)] for c in ctx])
    return q, k, v, slots, q_pos


def _reference(q, k, v, slots, q_pos, scale):
    b, ql, h, d = q.shape
    group = h // k.shape[1]
    out = torch.empty(b, ql, h, d, dtype=torch.float64)
    for i in range(b):
        for j in range(ql):
            n = int(q_pos[i, j]) + 1
            keys, vals = k[slots[i, :n]].double(), v[slots[i, :n]].double()          # [n, KVH, D]
            for hh in range(h):
                s = keys[:, hh // group] @ q[i, j, hh].double() * scale
                out[i, j, hh] = torch.softmax(s, 0) @ vals[:, hh // group]
    return out.reshape(b, ql, h * d)


def test_the_kernel_builds_and_runs_here():
    assert ra.available(), ra.unavailable_reason()


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 4e-3)])
@pytest.mark.parametrize("shape", [dict(), dict(heads=14, kv_heads=2, head_dim=64), dict(heads=4, kv_heads=4,
                                                                                           head_dim=40)])
def test_rows_match_softmax_attention(dtype, tol, shape):
    q, k, v, slots, q_pos = _case(dtype, **shape)
    scale = q.shape[-1] ** -0.5
    out = ra.row_attention(q, k, v, slots, q_pos, scale)
    assert out.dtype == dtype and out.shape == (2, 5, q.shape[2] * q.shape[3])
    torch.testing.assert_close(out.double(), _reference(q, k, v, slots, q_pos, scale), rtol=tol, atol=tol)


def test_a_row_gets_the_same_bits_alone_with_less_padding_or_in_another_batch():
    q, k, v, slots, q_pos = _case(torch.bfloat16, seed=3)
    full = ra.row_attention(q, k, v, slots, q_pos, 0.1)
    for i in range(2):
        for j in range(5):
            n = int(q_pos[i, j]) + 1
            alone = ra.row_attention(q[i:i + 1, j:j + 1], k, v, slots[i:i + 1, :n], q_pos[i:i + 1, j:j + 1], 0.1)
            assert torch.equal(alone[0, 0], full[i, j])


def test_a_query_that_would_see_past_its_context_is_refused():
    q, k, v, slots, q_pos = _case(torch.float32)
    with pytest.raises(RuntimeError, match="sees past its context"):
        ra.row_attention(q, k, v, slots[:, :100], q_pos, 0.1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_every_instruction_path_gives_the_same_bits(dtype):
    # AVX-512 and AVX2 compute each lane alike and add the softmax sum in the same order; head_dim 40 leaves a
    # scalar tail in the value loop, context 300/650 partial key blocks.
    q, k, v, slots, q_pos = _case(dtype, seed=5, heads=4, kv_heads=2, head_dim=40)
    outs = []
    for p in PATHS:
        with on_path(ra, p):
            outs.append(ra.row_attention(q, k, v, slots, q_pos, 0.15))
    assert all(torch.equal(outs[0], o) for o in outs[1:])
    torch.testing.assert_close(outs[0].double(), _reference(q, k, v, slots, q_pos, 0.15), rtol=4e-3, atol=4e-3)
