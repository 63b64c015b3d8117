"""Batch-invariant numerics on the real 1.5B target in bf16: a sequence's last-token logits are bitwise equal
alone, in a batch of 8, as row j of a verify chunk and after a rollback and re-feed, at TP=1 and TP=2; and, as
the negative control, they are not without the mode."""
import pytest

from common.config import EngineConfig
from common.engine.tp_executor import TPExecutor
from tests.common.layers.invariance import four_ways, mismatches
from tests.memory_watch import release_memory

pytestmark = pytest.mark.real_model


def _ways(real_models, tp: int, invariant: bool) -> dict:
    cfg = EngineConfig(model=str(real_models["target"]), dtype="bfloat16", tp_size=tp, kv_cache_memory_gib=0.25,
                       max_num_seqs=16, batch_invariant=invariant)
    with TPExecutor(cfg) as ex:
        ways = four_ways(ex, ex.model_config.vocab_size)
        assert ex.allocator.num_used == 0
    release_memory()                            # one 1.5B target at a time: hand its pages back before the next
    return ways


@pytest.mark.parametrize("tp", [1, 2])
def test_real_target_logits_are_batch_invariant_in_bf16(real_models, tp):
    assert mismatches(_ways(real_models, tp, invariant=True)) == {}


def test_without_the_mode_bf16_logits_depend_on_the_batch(real_models):
    diffs = mismatches(_ways(real_models, 1, invariant=False))
    print("bf16 without batch_invariant, max |logit difference| from the token alone:", diffs)
    assert diffs, "the negative control found no difference: the invariance test could not fail"
