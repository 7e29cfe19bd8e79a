"""The pool of KV-cache blocks: reference counts, and the prefix cache's map between block hashes
and blocks. Bookkeeping of block ids only; the KV cache manager (kv_cache_manager.py) decides
which request holds which block.

A block is never used, in use (its reference count is above 0), or cached: unused, but holding
a registered prefix. Cached blocks stay until an allocation finds no never-used block left and
evicts the least recently freed one.
"""

from collections import OrderedDict, deque
from collections.abc import Iterable


class BlockPool:
    def __init__(self, num_blocks: int):
        self.num_blocks = num_blocks
        self._never_used: deque[int] = deque(range(num_blocks))
        self._ref_counts = [0] * num_blocks  # by block id
        self._hash_of: dict[int, bytes] = {}  # block id -> hash, for registered blocks
        self._block_of: dict[bytes, int] = {}  # hash -> block id
        self._evictable: OrderedDict[int, None] = OrderedDict()  # cached, unused; least recently freed first

    @property
    def num_free_blocks(self) -> int:
        """Blocks an allocation could take: never used, or cached but unused."""
        return len(self._never_used) + len(self._evictable)

    @property
    def num_cached_blocks(self) -> int:
        """Blocks registered in the prefix cache, in use or not."""
        return len(self._block_of)

    def lookup(self, block_hash: bytes) -> int | None:
        """The block registered under `block_hash`, if any."""
        return self._block_of.get(block_hash)

    def num_unused(self, block_ids: Iterable[int]) -> int:
        """How many of `block_ids` no request uses: sharing them takes them off the free blocks."""
        return sum(1 for b in block_ids if self._ref_counts[b] == 0)

    def num_sole_users(self, block_ids: Iterable[int]) -> int:
        """How many of `block_ids` one request alone uses: its freeing them adds to the free blocks."""
        return sum(1 for b in block_ids if self._ref_counts[b] == 1)

    def share(self, block_ids: Iterable[int]) -> None:
        """Add a reference to each of the cached blocks `block_ids`."""
        for b in block_ids:
            if self._ref_counts[b] == 0:
                del self._evictable[b]
            self._ref_counts[b] += 1

    def allocate(self, num_blocks: int) -> list[int]:
        """Take `num_blocks` free blocks, never-used ones first, then evicting cached ones."""
        assert num_blocks <= self.num_free_blocks, f"{num_blocks} blocks asked, {self.num_free_blocks} free"
        block_ids = []
        for _ in range(num_blocks):
            if self._never_used:
                b = self._never_used.popleft()
            else:  # evict the least recently freed cached block
                b, _ = self._evictable.popitem(last=False)
                del self._block_of[self._hash_of.pop(b)]
            self._ref_counts[b] = 1
            block_ids.append(b)
        return block_ids

    def free(self, block_ids: Iterable[int]) -> None:
        """Drop one reference to each block, in this order: the order of eviction among the
        cached ones that become unused."""
        for b in block_ids:
            assert self._ref_counts[b] > 0, f"block {b} freed twice"
            self._ref_counts[b] -= 1
            if self._ref_counts[b] == 0:
                if b in self._hash_of:
                    self._evictable[b] = None
                else:
                    self._never_used.append(b)

    def register(self, block_id: int, block_hash: bytes) -> None:
        """Cache `block_id` under `block_hash`, unless either is registered already: the first
        writer wins."""
        if block_hash not in self._block_of and block_id not in self._hash_of:
            self._block_of[block_hash] = block_id
            self._hash_of[block_id] = block_hash

    def clear_hashes(self) -> None:
        """Forget every registration; unused cached blocks become never-used ones."""
        self._never_used.extend(self._evictable)
        self._evictable.clear()
        self._hash_of.clear()
        self._block_of.clear()
