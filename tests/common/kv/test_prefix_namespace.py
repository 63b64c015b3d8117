"""Per-tenant prefix-cache namespaces: a tenant finds only the blocks it published itself, the shared namespace ("")
keeps today's root, and a hit's logits equal a miss's."""
import torch

from common.config import PrefixCacheConfig
from common.engine.model_runner import SequenceChunk
from common.kv.block_hash import namespace_root, tenant_root
from tests.common.kv.conftest import BS, SYSTEM, _flush, _runner


def _publish(r, seq, tokens, namespace):
    r.forward([SequenceChunk(seq, tokens, cache_namespace=namespace)])
    r.truncate(seq, len(tokens))                        # the round's rollback publishes the full blocks
    _flush(r)


def test_a_tenant_hits_its_own_blocks_and_misses_another_tenants(ckpt, reference):
    r = _runner(ckpt, PrefixCacheConfig(local_mib=16))
    _publish(r, 1, SYSTEM + [1, 2, 3], "aaaa1111")
    other = r.forward([SequenceChunk(2, SYSTEM + [9, 8, 7, 6], cache_namespace="bbbb2222")])
    shared = r.forward([SequenceChunk(3, SYSTEM + [9, 8, 7, 6])])
    same = r.forward([SequenceChunk(4, SYSTEM + [9, 8, 7, 6], cache_namespace="aaaa1111")])
    assert other.cached_tokens == [0] and shared.cached_tokens == [0]
    assert same.cached_tokens == [2 * BS]
    for fwd in (other, shared, same):                   # hit or miss, the same logits
        torch.testing.assert_close(fwd.logits[0], reference[(9, 8, 7, 6)], rtol=0, atol=1e-5)
    r.close()


def test_blocks_are_published_under_the_sequences_own_namespace(ckpt):
    r = _runner(ckpt, PrefixCacheConfig(local_mib=16))
    _publish(r, 1, SYSTEM + [1, 2, 3], "bbbb2222")
    r.forward([SequenceChunk(1, [4])])                  # later chunks name no namespace: the sequence keeps its own
    r.truncate(1, len(SYSTEM) + 4)
    _flush(r)
    assert r.forward([SequenceChunk(2, SYSTEM + [5], cache_namespace="bbbb2222")]).cached_tokens == [2 * BS]
    assert r.forward([SequenceChunk(3, SYSTEM + [5], cache_namespace="cccc3333")]).cached_tokens == [0]
    r.close()


def test_the_shared_namespace_keeps_todays_root():
    root = namespace_root("fp", "float32", 16, 0, 1)
    assert tenant_root(root, "") == root
    assert len({root, tenant_root(root, "a"), tenant_root(root, "b")}) == 3


def test_a_namespace_is_checked_at_the_edge():
    import pytest

    from common.validation import check_cache_namespace
    check_cache_namespace("cache_namespace", "")
    check_cache_namespace("cache_namespace", "a" * 64)
    with pytest.raises(ValueError, match="65 characters, must be <= 64"):
        check_cache_namespace("cache_namespace", "a" * 65)
    with pytest.raises(ValueError, match="not printable"):
        check_cache_namespace("cache_namespace", "tenant\n1")


def test_the_draft_proposer_roots_its_sequences_in_the_requests_namespace(ckpt):
    from common.speculative.params import SamplingParams
    from common.speculative.proposers import ProposeInput
    from common.speculative.proposers.draft_model import DraftModelProposer
    r = _runner(ckpt, PrefixCacheConfig(local_mib=16))
    proposer = DraftModelProposer(r)
    context = SYSTEM + [1, 2, 3]
    proposer.propose([ProposeInput(1, context, 2, SamplingParams(), 0, "aaaa1111")])
    proposer.propose([ProposeInput(1, context + [4], 2, SamplingParams(), 1, "aaaa1111")])   # rollback publishes
    _flush(r)
    assert r.forward([SequenceChunk(2, SYSTEM + [5], cache_namespace="aaaa1111")]).cached_tokens == [2 * BS]
    assert r.forward([SequenceChunk(3, SYSTEM + [5], cache_namespace="bbbb2222")]).cached_tokens == [0]
    r.close()
