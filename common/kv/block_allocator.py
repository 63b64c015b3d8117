"""Fixed-size KV blocks handed out from a free list; freeing returns them, nothing else owns them."""
from __future__ import annotations

from collections import deque

from common.errors import KVCacheExhaustedError


def blocks_for(num_tokens: int, block_size: int) -> int:
    """Blocks that hold `num_tokens` tokens (what the engines count before a pass, to admit what fits)."""
    return -(-num_tokens // block_size)


class BlockAllocator:
    def __init__(self, num_blocks: int):
        if num_blocks < 1:
            raise ValueError(f"num_blocks={num_blocks}: must be >= 1")
        self.num_blocks = num_blocks
        self._free: deque[int] = deque(range(num_blocks))
        self._used: set[int] = set()

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return len(self._used)

    def allocate(self, n: int) -> list[int]:
        if n > len(self._free):
            raise KVCacheExhaustedError(
                f"KV cache exhausted: need {n} more block(s), {len(self._free)} of {self.num_blocks} free "
                "(raise kv_cache_memory_gib / num_kv_blocks, or send fewer or shorter requests)")
        blocks = [self._free.popleft() for _ in range(n)]
        self._used.update(blocks)
        return blocks

    def free(self, blocks: list[int]) -> None:
        for b in blocks:
            if b not in self._used:
                raise ValueError(f"block {b} freed twice or never allocated")
            self._used.remove(b)
            self._free.append(b)
