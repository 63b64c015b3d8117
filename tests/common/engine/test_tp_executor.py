"""Two spawned gloo ranks give the same logits as one rank, for prefill, decode and a K+1-token extend."""
import pytest
import torch

from common.config import EngineConfig
from common.engine.greedy import greedy_generate
from common.engine.model_runner import SequenceChunk
from common.engine.tp_executor import TPExecutor


def _script(ex):
    g = torch.Generator().manual_seed(7)
    a, b = torch.randint(0, 128, (19,), generator=g).tolist(), torch.randint(0, 128, (6,), generator=g).tolist()
    out = []
    out += ex.forward([SequenceChunk(0, a, num_logits=19), SequenceChunk(1, b, num_logits=6)]).logits   # prefill
    out += ex.forward([SequenceChunk(0, [3]), SequenceChunk(1, [4])]).logits                           # decode
    out += ex.forward([SequenceChunk(0, [5, 6, 7, 8, 9], num_logits=5)]).logits                        # verify K=4
    ex.truncate(0, 22)                                                                                 # rollback
    out += ex.forward([SequenceChunk(0, [10, 11], num_logits=2), SequenceChunk(1, [12])]).logits
    return out


@pytest.mark.parametrize("arch", ["qwen2", "llama"])   # llama: tied head over a vocab-parallel embedding
def test_tp2_matches_tp1(arch, tiny_checkpoints):
    cfg = dict(model=str(tiny_checkpoints[arch]), num_kv_blocks=32, block_size=4)
    with TPExecutor(EngineConfig(**cfg, tp_size=1)) as ex1:
        ref = _script(ex1)
    with TPExecutor(EngineConfig(**cfg, tp_size=2)) as ex2:
        got = _script(ex2)
        assert len(ex2._workers) == 1 and ex2._workers[0].is_alive()
        free_before = ex2.allocator.num_free
        out = greedy_generate(ex2, [[1, 2, 3]], max_new_tokens=4)
        assert len(out[0].token_ids) == 4 and ex2.allocator.num_free == free_before
    for r, g in zip(ref, got, strict=True):
        assert r.shape == g.shape
        assert (r - g).abs().max().item() <= 1e-4


def test_tp2_errors_reach_the_caller_and_the_group_keeps_working(tiny_checkpoints):
    with TPExecutor(EngineConfig(model=str(tiny_checkpoints["qwen2"]), num_kv_blocks=8, tp_size=2,
                                 max_model_len=40)) as ex:
        with pytest.raises(ValueError, match="outside the vocabulary"):
            ex.forward([SequenceChunk(0, [999])])
        out = ex.forward([SequenceChunk(0, [1, 2, 3])])
        assert out.logits[0].shape == (1, 128) and out.cached_tokens == [0]
