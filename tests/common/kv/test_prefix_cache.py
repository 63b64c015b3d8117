"""The prefix cache under the model runner: local and Redis tiers, collisions, TTL, Redis faults, TP=2.

Every hit is checked two ways: the runner computed only the uncached tokens, and the logits equal those of a
runner without any cache (fixtures and helpers: conftest.py).
"""
import time

import pytest
import torch

from common.config import EngineConfig, PrefixCacheConfig
from common.engine.model_runner import ModelRunner, SequenceChunk
from common.kv.block_auth import BlockSigner
from common.kv.prefix_cache import KEY_PREFIX
from tests.common.kv.conftest import BS, HMAC_KEY, SYSTEM, _flush, _prefill_and_commit, _runner, _shared


def test_local_hit_computes_only_the_rest_and_matches(ckpt, reference):
    r = _runner(ckpt, PrefixCacheConfig(local_mib=16))
    _prefill_and_commit(r, 1, SYSTEM + [1, 2, 3])
    _flush(r)
    fwd = r.forward([SequenceChunk(2, SYSTEM + [9, 8, 7, 6])])
    [logits] = fwd.logits
    assert fwd.cached_tokens == [2 * BS]
    assert r.num_tokens(2) == len(SYSTEM) + 4
    torch.testing.assert_close(logits, reference[(9, 8, 7, 6)], rtol=0, atol=1e-5)
    r.free(1), r.free(2)
    assert r.allocator.num_used == 0
    r.close()


def test_a_batch_mixing_hits_and_misses(ckpt, reference):
    r = _runner(ckpt, PrefixCacheConfig(local_mib=16))
    _prefill_and_commit(r, 1, SYSTEM + [1, 2, 3])
    _flush(r)
    fwd = r.forward([SequenceChunk(2, SYSTEM + [9, 8, 7, 6]), SequenceChunk(3, [5] * 20)])
    a, b = fwd.logits
    assert fwd.cached_tokens == [2 * BS, 0]
    torch.testing.assert_close(a, reference[(9, 8, 7, 6)], rtol=0, atol=1e-5)
    r.close()


def test_short_prompts_and_logit_positions_are_always_computed(ckpt):
    r = _runner(ckpt, PrefixCacheConfig(local_mib=16))
    _prefill_and_commit(r, 1, SYSTEM[:32])              # exactly 2 full blocks
    _flush(r)
    fwd = r.forward([SequenceChunk(2, SYSTEM[:32])])    # the last token needs logits: only block 1 loads
    assert fwd.cached_tokens == [BS]
    fwd = r.forward([SequenceChunk(3, SYSTEM[:32] + [4, 5], num_logits=3)])
    assert fwd.cached_tokens == [BS]                    # 34 tokens, 3 with logits: 31 cacheable = 1 block
    r.close()


def test_redis_shares_blocks_between_replicas(ckpt, reference, redis_server):
    cfg = _shared(redis_server, local_mib=16)
    first, second = _runner(ckpt, cfg), _runner(ckpt, cfg)
    _prefill_and_commit(first, 1, SYSTEM + [1, 2, 3])
    _flush(first)
    assert len(redis_server.client().keys(KEY_PREFIX + "*")) == 2
    fwd = second.forward([SequenceChunk(1, SYSTEM + [9, 8, 7, 6])])
    [logits] = fwd.logits
    assert fwd.cached_tokens == [2 * BS]
    torch.testing.assert_close(logits, reference[(9, 8, 7, 6)], rtol=0, atol=1e-5)
    assert len(second.prefix_cache.local) == 2          # a Redis hit is kept locally
    first.close(), second.close()


def test_collision_guard_refuses_and_deletes_a_mismatching_entry(ckpt, reference, redis_server):
    cfg = _shared(redis_server, local_mib=16)
    first, second = _runner(ckpt, cfg), _runner(ckpt, cfg)
    _prefill_and_commit(first, 1, SYSTEM + [1, 2, 3])
    _flush(first)
    client = redis_server.client()
    key0, key1 = (KEY_PREFIX + h.hex() for h in first._hashes[1][:2])
    signer = BlockSigner(HMAC_KEY)                       # a hash collision: block 0 sealed under block 1's key
    client.set(key1, signer.seal(key1, signer.open(key0, client.get(key0))))
    fwd = second.forward([SequenceChunk(1, SYSTEM + [9, 8, 7, 6])])
    [logits] = fwd.logits
    assert fwd.cached_tokens == [BS]                    # block 0 loaded, block 1 refused and recomputed
    assert client.get(key1) is None                     # ... and deleted
    torch.testing.assert_close(logits, reference[(9, 8, 7, 6)], rtol=0, atol=1e-5)
    client.set(key0, b"garbage")
    third = _runner(ckpt, cfg)
    fwd = third.forward([SequenceChunk(1, SYSTEM + [9, 8, 7, 6])])
    assert fwd.cached_tokens == [0] and client.get(key0) is None
    first.close(), second.close(), third.close()


def test_redis_entries_expire(ckpt, redis_server):
    cfg = _shared(redis_server, local_mib=16, ttl_s=1)
    first = _runner(ckpt, cfg)
    _prefill_and_commit(first, 1, SYSTEM + [1, 2, 3])
    _flush(first)
    ttls = [redis_server.client().ttl(k) for k in redis_server.client().keys(KEY_PREFIX + "*")]
    assert ttls and all(0 < t <= 1 for t in ttls)
    time.sleep(2.1)
    assert redis_server.client().keys(KEY_PREFIX + "*") == []
    late = _runner(ckpt, cfg)
    fwd = late.forward([SequenceChunk(1, SYSTEM + [9, 8, 7, 6])])
    assert fwd.cached_tokens == [0]
    first.close(), late.close()


def test_redis_killed_is_bypassed_and_output_unchanged(ckpt, reference, redis_server):
    cfg = _shared(redis_server, local_mib=0, redis_timeout_s=0.2)
    r = _runner(ckpt, cfg)
    _prefill_and_commit(r, 1, SYSTEM + [1, 2, 3])
    _flush(r)
    redis_server.kill()
    t = time.perf_counter()
    fwd = r.forward([SequenceChunk(2, SYSTEM + [9, 8, 7, 6])])
    [logits] = fwd.logits
    assert time.perf_counter() - t < 5
    assert fwd.cached_tokens == [0]
    torch.testing.assert_close(logits, reference[(9, 8, 7, 6)], rtol=0, atol=1e-5)
    r.truncate(2, len(SYSTEM) + 4)                       # publishing to a dead Redis is bypassed too
    _flush(r)
    r.free(1), r.free(2)
    assert r.allocator.num_used == 0
    r.close()


def test_garbage_from_redis_is_refused(ckpt, reference, redis_server):
    cfg = _shared(redis_server, local_mib=0)
    writer = _runner(ckpt, cfg)
    _prefill_and_commit(writer, 1, SYSTEM + [1, 2, 3])
    _flush(writer)
    client = redis_server.client()
    for key in client.keys(KEY_PREFIX + "*"):
        value = bytearray(client.get(key))
        value[-1] ^= 0xFF                               # flips bits of the tag: the header is intact
        client.set(key, bytes(value[:-3]))              # ...and the length is wrong
    reader = _runner(ckpt, cfg)
    fwd = reader.forward([SequenceChunk(1, SYSTEM + [9, 8, 7, 6])])
    [logits] = fwd.logits
    assert fwd.cached_tokens == [0]
    torch.testing.assert_close(logits, reference[(9, 8, 7, 6)], rtol=0, atol=1e-5)
    writer.close(), reader.close()


def test_refused_batch_leaves_no_loaded_blocks(ckpt):
    r = _runner(ckpt, PrefixCacheConfig(local_mib=16))
    _prefill_and_commit(r, 1, SYSTEM + [1, 2, 3])
    _flush(r)
    used = r.allocator.num_used
    with pytest.raises(ValueError, match="outside the vocabulary"):
        r.forward([SequenceChunk(2, SYSTEM + [9, 999])])
    assert r.allocator.num_used == used and 2 not in r.sequences
    r.close()


def test_tensor_parallel_ranks_load_their_own_shards(ckpt, reference, redis_server):
    # One TP group per process at a time: the replicas take turns.
    cfg = _shared(redis_server, local_mib=16)
    client = redis_server.client()
    first = _runner(ckpt, cfg, tp=2)
    try:
        first.forward([SequenceChunk(1, SYSTEM + [1, 2, 3])])
        first.truncate(1, len(SYSTEM) + 3)
        rank0_block1 = KEY_PREFIX + first.runner._hashes[1][1].hex()
        deadline = time.monotonic() + 10                 # rank 1 publishes from its own process
        while len(client.keys(KEY_PREFIX + "*")) < 4 and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        first.shutdown()
    assert len(client.keys(KEY_PREFIX + "*")) == 4       # 2 blocks x 2 ranks, each its own shard
    second = _runner(ckpt, cfg, tp=2)
    try:
        fwd = second.forward([SequenceChunk(1, SYSTEM + [9, 8, 7, 6])])
        [logits] = fwd.logits
        assert fwd.cached_tokens == [2 * BS]
        torch.testing.assert_close(logits, reference[(9, 8, 7, 6)], rtol=0, atol=1e-4)
    finally:
        second.shutdown()
    client.delete(rank0_block1)                          # one rank's shard of block 1 is gone...
    third = _runner(ckpt, cfg, tp=2)
    try:
        fwd = third.forward([SequenceChunk(1, SYSTEM + [9, 8, 7, 6])])
        [logits] = fwd.logits
        assert fwd.cached_tokens == [BS]                # ...so both ranks load block 0 only
        torch.testing.assert_close(logits, reference[(9, 8, 7, 6)], rtol=0, atol=1e-4)
    finally:
        third.shutdown()


def test_blocks_computed_under_quantized_weights_are_never_served_to_another_quantization(ckpt, redis_server):
    # The quantization is part of every chain's root: same checkpoint, same dtype, disjoint blocks.
    cfg = _shared(redis_server, local_mib=16)
    runners = {q: ModelRunner(EngineConfig(model=ckpt, dtype="float32", num_kv_blocks=64, prefix_cache=cfg,
                                           quantization=q)) for q in ("none", "int8", "int4")}
    prompt = SYSTEM + [4, 4, 4]
    _prefill_and_commit(runners["int4"], 1, prompt)
    _flush(runners["int4"])
    assert runners["none"].forward([SequenceChunk(1, prompt)]).cached_tokens == [0]
    assert runners["int8"].forward([SequenceChunk(1, prompt)]).cached_tokens == [0]
    again = ModelRunner(EngineConfig(model=ckpt, dtype="float32", num_kv_blocks=64, prefix_cache=cfg,
                                     quantization="int4"))
    assert again.forward([SequenceChunk(1, prompt)]).cached_tokens == [2 * BS]   # while int4 itself hits
    for r in (*runners.values(), again):
        r.close()
