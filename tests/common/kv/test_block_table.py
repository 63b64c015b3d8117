"""Block allocation, growth and rollback of one sequence's block table."""
import pytest

from common.errors import KVCacheExhaustedError
from common.kv.block_allocator import BlockAllocator
from common.kv.block_table import BlockTable


def test_grow_allocates_whole_blocks_and_slots_follow_them():
    alloc = BlockAllocator(8)
    t = BlockTable(block_size=4)
    t.grow(6, alloc)
    assert len(t.blocks) == 2 and alloc.num_free == 6
    b0, b1 = t.blocks
    assert t.slots(2, 6) == [b0 * 4 + 2, b0 * 4 + 3, b1 * 4, b1 * 4 + 1]


def test_truncate_frees_only_tail_blocks():
    alloc = BlockAllocator(8)
    t = BlockTable(block_size=4)
    t.grow(11, alloc)
    t.num_tokens = 11
    kept = t.blocks[:2]
    t.truncate(5, alloc)                         # 5 tokens need 2 blocks
    assert t.blocks == kept and t.num_tokens == 5 and alloc.num_free == 6
    t.truncate(4, alloc)                         # exactly one full block
    assert len(t.blocks) == 1 and alloc.num_free == 7
    with pytest.raises(ValueError, match="truncate_to=9"):
        t.truncate(9, alloc)


def test_release_returns_everything():
    alloc = BlockAllocator(4)
    t = BlockTable(block_size=2)
    t.grow(7, alloc)
    t.release(alloc)
    assert alloc.num_free == 4 and t.blocks == []


def test_exhaustion_is_a_clear_error_and_allocates_nothing():
    alloc = BlockAllocator(3)
    alloc.allocate(2)
    with pytest.raises(KVCacheExhaustedError, match="need 2 more block\\(s\\), 1 of 3 free"):
        alloc.allocate(2)
    assert alloc.num_free == 1


def test_double_free_is_refused():
    alloc = BlockAllocator(2)
    blocks = alloc.allocate(1)
    alloc.free(blocks)
    with pytest.raises(ValueError, match="freed twice"):
        alloc.free(blocks)
