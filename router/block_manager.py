"""The router's pool of KV-cache blocks: the one source of truth for shard memory."""

from collections import deque


class BlockManager:
    """Hands out block ids; the scheduler checks with `can_allocate` before it allocates."""

    def __init__(self, num_blocks: int, block_size: int):
        self.num_blocks, self.block_size = num_blocks, block_size
        self._free: deque[int] = deque(range(num_blocks))
        self._used: set[int] = set()

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    def blocks_needed(self, num_tokens: int, num_held: int) -> int:
        """Blocks to add to `num_held` so that `num_tokens` tokens fit."""
        return max(0, -(-num_tokens // self.block_size) - num_held)

    def can_allocate(self, num_blocks: int) -> bool:
        return num_blocks <= len(self._free)

    def allocate(self, num_blocks: int) -> list[int]:
        assert self.can_allocate(num_blocks), "allocate() without can_allocate()"
        block_ids = [self._free.popleft() for _ in range(num_blocks)]
        self._used.update(block_ids)
        return block_ids

    def free(self, block_ids: list[int]) -> None:
        for block_id in block_ids:
            assert block_id in self._used, f"block {block_id} freed twice"
            self._used.remove(block_id)
            self._free.append(block_id)
