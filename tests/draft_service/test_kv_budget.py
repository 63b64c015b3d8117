"""The drafter counts KV blocks before a pass, like the verifier: a batch larger than the cache is drafted in groups
that fit (each proposal equal to a one-at-a-time one), and a call that could never fit is refused at submit."""
import pytest

from common.config import EngineConfig
from common.engine.model_runner import ModelRunner
from common.errors import KVCacheExhaustedError
from common.speculative.params import SamplingParams
from draft_service.drafter import Drafter
from tests.checkpoints import build_model_folder
from tests.draft_service.propose_gate import ProposeGate

GREEDY = SamplingParams()
CONTEXTS = [[1 + (i * 7 + j) % 120 for j in range(40)] for i in range(5)]    # 40 + K=4: 3 blocks of 16 each


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return str(build_model_folder(tmp_path_factory.mktemp("draft-kv") / "draft", seed=4))


def _drafter(folder, num_kv_blocks):
    runner = ModelRunner(EngineConfig(model=folder, dtype="float32", num_kv_blocks=num_kv_blocks, max_num_seqs=16))
    return Drafter(runner, k_max=8, max_cached_sequences=8)


def test_a_batch_larger_than_the_cache_is_drafted_in_groups_that_fit(folder):
    alone = _drafter(folder, 128)
    try:
        expected = [alone.propose(f"r{i}", ctx, 4, GREEDY, 0, timeout=30).proposal.token_ids
                    for i, ctx in enumerate(CONTEXTS)]
    finally:
        alone.shutdown()
    d = _drafter(folder, 8)                                  # 8 blocks: two calls at a time (6 blocks)
    groups = []
    propose = d.proposer.propose

    def counted(requests):
        groups.append(len(requests))
        return propose(requests)
    d.proposer.propose = counted
    gate = ProposeGate(d)
    try:
        first = d.submit("warm", [1, 2, 3], 2, GREEDY, 0)
        gate.wait_entered()
        futs = [d.submit(f"r{i}", ctx, 4, GREEDY, 0) for i, ctx in enumerate(CONTEXTS)]
        gate.release()
        first.result(30)
        results = [f.result(30) for f in futs]
    finally:
        d.shutdown()
    assert [r.proposal.token_ids for r in results] == expected
    assert list(d.batch_sizes) == [1, 5] and groups == [1, 2, 2, 1]
    assert all(r.batch_size == 5 for r in results)


def test_a_context_that_never_fits_is_refused_at_submit_naming_the_limit(folder):
    d = _drafter(folder, 2)                                  # 32 tokens
    try:
        with pytest.raises(KVCacheExhaustedError, match="33 tokens \\+ K=2 need 3 KV blocks of 16 tokens, the "
                                                        "draft's whole cache holds 2"):
            d.submit("long", list(range(1, 34)), 2, GREEDY, 0)
        assert d.propose("short", list(range(1, 30)), 4, GREEDY, 0, timeout=30).proposal.k == 4
    finally:
        d.shutdown()
