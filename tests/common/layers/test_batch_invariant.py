"""Batch-invariant numerics: the row tile search and the attention proof on this machine's kernels (with
negative controls), and a token's logits equal bit for bit however its forward pass is shared (tiny models here;
the real target in test_batch_invariant_real.py)."""
import pytest
import torch
import torch.nn.functional as F

from common.config import EngineConfig
from common.engine.model_runner import ModelRunner
from common.errors import ConfigError
from common.layers import batch_invariant as bi
from tests.common.layers.invariance import four_ways, mismatches


def test_pad_rows_appends_zero_rows_up_to_the_tile():
    x = torch.ones(5, 3)
    assert bi.pad_rows(x, 4).shape == (8, 3) and bi.pad_rows(x, 4)[5:].abs().sum() == 0
    assert bi.pad_rows(x, 5) is x


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_found_row_tile_makes_a_real_matmul_row_invariant(dtype):
    w = (torch.randn(896, 1536, generator=torch.Generator().manual_seed(3)) * 0.02).to(dtype)
    tile = bi.find_row_tile(lambda x: F.linear(x, w), 1536, dtype, torch.device("cpu"))
    assert tile in bi.ROW_TILES
    x = torch.randn(37, 1536, generator=torch.Generator().manual_seed(4)).to(dtype)
    batched = F.linear(bi.pad_rows(x, tile), w)[:37]
    for j in range(37):
        assert torch.equal(batched[j:j + 1], F.linear(bi.pad_rows(x[j:j + 1], tile), w)[:1])


def test_a_matmul_that_depends_on_the_row_count_is_refused():
    # Negative control: the search must not accept a kernel whose rows see how many rows there are.
    def counting(x):
        return x[:, :4] * x.shape[0]
    with pytest.raises(ConfigError, match="no row tile"):
        bi.find_row_tile(counting, 8, torch.float32, torch.device("cpu"))


def test_invariant_attention_holds_on_this_machine():
    bi.check_attention(12, 2, 128, torch.bfloat16, torch.device("cpu"))   # raises if not


def test_plain_sdpa_is_not_row_invariant_in_bf16():
    # Why the invariant path exists: the same query as the last row of 5 and alone gives other bits (for at least
    # one of a few random draws; contexts over one 512-key block).
    differs = []
    for seed in range(4):
        g = torch.Generator().manual_seed(seed)
        k, v = (torch.randn(1, 2, 1200, 128, generator=g).bfloat16() for _ in range(2))
        q = torch.randn(1, 12, 5, 128, generator=g).bfloat16()
        mask = torch.arange(1200).view(1, -1) <= torch.arange(1195, 1200).view(-1, 1)      # [5, 1200]
        five = F.scaled_dot_product_attention(q, k, v, attn_mask=mask.view(1, 1, 5, 1200), enable_gqa=True)
        one = F.scaled_dot_product_attention(q[:, :, 4:], k, v, attn_mask=mask[4:].view(1, 1, 1, 1200),
                                             enable_gqa=True)
        differs.append(not torch.equal(five[:, :, 4:], one))
    assert any(differs)


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_logits_equal_bit_for_bit_however_the_pass_is_shared(tiny_checkpoints, arch):
    runner = ModelRunner(EngineConfig(model=str(tiny_checkpoints[arch]), dtype="bfloat16", batch_invariant=True,
                                      num_kv_blocks=256, block_size=4))
    assert {m.row_tile for m in runner.model.modules() if isinstance(m, bi.RowTiled)} <= set(bi.ROW_TILES)
    ways = four_ways(runner, runner.model_config.vocab_size)
    assert mismatches(ways) == {}
    assert runner.allocator.num_used == 0


def test_batch_invariant_refuses_a_gpu_device():
    with pytest.raises(ConfigError, match="batch_invariant=True with device='cuda'"):
        EngineConfig(model="unused", device="cuda", batch_invariant=True)
    with pytest.raises(ConfigError, match="CPU kernels only"):
        bi.enable(torch.nn.Linear(2, 2), 2, 1, 4, torch.float32, torch.device("cuda"))


def test_logits_equal_bit_for_bit_at_tp2(tiny_checkpoints):
    from common.engine.tp_executor import TPExecutor
    cfg = EngineConfig(model=str(tiny_checkpoints["qwen2"]), dtype="bfloat16", batch_invariant=True, tp_size=2,
                       num_kv_blocks=256, block_size=4)
    with TPExecutor(cfg) as ex:
        assert mismatches(four_ways(ex, ex.model_config.vocab_size)) == {}


def test_the_padded_flash_fallback_is_still_row_invariant(monkeypatch):
    # Where specd's row attention kernel cannot run, the padded flash path serves and must pass the same proof.
    from common.kernels import row_attention
    monkeypatch.setattr(row_attention, "available", lambda: False)
    bi.check_attention(12, 2, 128, torch.bfloat16, torch.device("cpu"))     # raises if not
