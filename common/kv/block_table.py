"""One sequence's view of the paged KV cache: which blocks hold its tokens, and how many tokens it has."""
from __future__ import annotations

from common.kv.block_allocator import BlockAllocator


class BlockTable:
    def __init__(self, block_size: int):
        self.block_size = block_size
        self.blocks: list[int] = []
        self.num_tokens = 0            # tokens whose K/V are in the cache

    def blocks_needed(self, new_len: int) -> int:
        """Blocks to allocate before the sequence can hold `new_len` tokens."""
        return max(0, -(-new_len // self.block_size) - len(self.blocks))

    def grow(self, new_len: int, allocator: BlockAllocator) -> None:
        need = self.blocks_needed(new_len)
        if need:
            self.blocks.extend(allocator.allocate(need))

    def slots(self, start: int, end: int) -> list[int]:
        """Cache slot (block·block_size + offset) of each token position in [start, end)."""
        bs = self.block_size
        return [self.blocks[p // bs] * bs + p % bs for p in range(start, end)]

    def truncate(self, new_len: int, allocator: BlockAllocator) -> None:
        """Roll back to the first `new_len` tokens and free every block past them."""
        if not 0 <= new_len <= self.num_tokens:
            raise ValueError(f"truncate_to={new_len}: must be in [0, {self.num_tokens}]")
        keep = -(-new_len // self.block_size)
        allocator.free(self.blocks[keep:])
        del self.blocks[keep:]
        self.num_tokens = new_len

    def release(self, allocator: BlockAllocator) -> None:
        allocator.free(self.blocks)
        self.blocks = []
        self.num_tokens = 0
