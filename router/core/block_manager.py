"""The router's pool of KV-cache blocks, with prefix caching: the one source of truth for
shard memory.

A block whose tokens are all computed gets a hash chained from its predecessor's, so equal
hashes mean equal prefixes. A hashed block stays cached after its last user frees it and is
evicted least-recently-freed first, only when no never-used block is left. The scheduler
checks with `can_allocate` before it allocates.
"""

from collections import OrderedDict, deque
from hashlib import blake2b


def extend_block_hashes(hashes: list[bytes], token_ids: list[int], block_size: int, num_blocks: int) -> list[bytes]:
    """Extend `hashes`, the chained hashes of a sequence's full blocks, to `num_blocks`."""
    for i in range(len(hashes), num_blocks):
        block = token_ids[i * block_size : (i + 1) * block_size]
        prev = hashes[-1] if hashes else b""
        hashes.append(blake2b(prev + b"".join(t.to_bytes(4, "little") for t in block), digest_size=16).digest())
    return hashes


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        self.num_blocks, self.block_size = num_blocks, block_size
        self.enable_prefix_caching = enable_prefix_caching
        self._never_used: deque[int] = deque(range(num_blocks))
        self._ref_counts = [0] * num_blocks
        self._hash_of: dict[int, bytes] = {}  # block id -> hash, for cached blocks
        self._block_of: dict[bytes, int] = {}  # hash -> block id
        self._evictable: OrderedDict[int, None] = OrderedDict()  # cached, unused; oldest first

    @property
    def num_free_blocks(self) -> int:
        """Blocks an allocation could take: never used, or cached but unused."""
        return len(self._never_used) + len(self._evictable)

    @property
    def num_cached_blocks(self) -> int:
        return len(self._block_of)

    def blocks_needed(self, num_tokens: int, num_held: int) -> int:
        """Blocks to add to `num_held` so that `num_tokens` tokens fit."""
        return max(0, -(-num_tokens // self.block_size) - num_held)

    def match_prefix(self, token_ids: list[int], hashes: list[bytes]) -> list[int]:
        """Cached blocks holding the longest prefix of `token_ids`; at least one token is
        left out, because the last one must be computed to produce logits. `hashes` is the
        sequence's hash chain, extended as needed."""
        if not self.enable_prefix_caching:
            return []
        matched, limit = [], (len(token_ids) - 1) // self.block_size
        # `hashes` may already cover more blocks (a preempted request's whole sequence): stop at the limit.
        for h in extend_block_hashes(hashes, token_ids, self.block_size, limit)[:limit]:
            block_id = self._block_of.get(h)
            if block_id is None:
                break
            matched.append(block_id)
        return matched

    def can_allocate(self, num_blocks: int, reused: list[int] = ()) -> bool:
        """Whether `num_blocks` new blocks fit once the cached blocks `reused` are taken."""
        num_revived = sum(1 for b in reused if self._ref_counts[b] == 0)
        return num_blocks <= self.num_free_blocks - num_revived

    def reuse(self, block_ids: list[int]) -> None:
        """Share cached blocks (from `match_prefix`) with one more request."""
        for b in block_ids:
            if self._ref_counts[b] == 0:
                del self._evictable[b]
            self._ref_counts[b] += 1

    def allocate(self, num_blocks: int) -> list[int]:
        assert num_blocks <= self.num_free_blocks, "allocate() without can_allocate()"
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

    def free(self, block_ids: list[int]) -> None:
        """Drop one reference to each block; the last block of a sequence is freed first so
        that, on eviction, a prefix outlives its continuations."""
        for b in reversed(block_ids):
            assert self._ref_counts[b] > 0, f"block {b} freed twice"
            self._ref_counts[b] -= 1
            if self._ref_counts[b] == 0:
                if b in self._hash_of:
                    self._evictable[b] = None
                else:
                    self._never_used.append(b)

    def cache_full_blocks(
        self, token_ids: list[int], block_ids: list[int], num_computed: int, hashes: list[bytes], num_registered: int
    ) -> int:
        """Register the blocks of a sequence that became full and computed. `hashes` is the
        sequence's hash chain (extended here); returns how many of `block_ids` are now
        registered, to pass back as `num_registered` next time."""
        num_full = min(num_computed // self.block_size, len(block_ids))
        if not self.enable_prefix_caching or num_full <= num_registered:
            return num_registered
        extend_block_hashes(hashes, token_ids, self.block_size, num_full)
        for i in range(num_registered, num_full):
            b, h = block_ids[i], hashes[i]
            if h not in self._block_of and b not in self._hash_of:  # first writer wins
                self._block_of[h] = b
                self._hash_of[b] = h
        return num_full

    def clear_prefix_cache(self) -> None:
        """Forget every cached prefix; unused cached blocks become plain free blocks."""
        self._never_used.extend(self._evictable)
        self._evictable.clear()
        self._hash_of.clear()
        self._block_of.clear()
