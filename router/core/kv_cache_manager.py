"""The router's KV cache manager: the one source of truth for shard memory.

It owns each request's block table (block i holds the K/V of tokens [i * block_size,
(i + 1) * block_size)) and the chained hashes of its full blocks, keyed by request id; the
scheduler only asks. A block whose tokens are all known and computed gets a hash chained from
its predecessor's, so equal hashes mean equal prefixes; the pool (block_pool.py) keeps hashed
blocks cached after their last user frees them. `allocate_slots` is all or nothing: there is
no separate check to forget before allocating.
"""

from collections.abc import Sequence
from dataclasses import dataclass, field
from hashlib import blake2b

from router.core.block_pool import BlockPool
from router.core.request import Request


def _extend_hashes(hashes: list[bytes], token_ids: list[int], block_size: int, num_blocks: int) -> None:
    """Extend `hashes`, the chained hashes of a sequence's full blocks, to `num_blocks`."""
    for i in range(len(hashes), num_blocks):
        block = token_ids[i * block_size : (i + 1) * block_size]
        prev = hashes[-1] if hashes else b""
        hashes.append(blake2b(prev + b"".join(t.to_bytes(4, "little") for t in block), digest_size=16).digest())


@dataclass(slots=True)
class _RequestBlocks:
    table: list[int] = field(default_factory=list)  # block ids, in token order
    hashes: list[bytes] = field(default_factory=list)  # of full blocks; a function of the tokens, kept on preemption
    num_registered: int = 0  # leading blocks of `table` offered to the prefix cache


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.pool = BlockPool(num_blocks)
        self._requests: dict[int, _RequestBlocks] = {}  # req_id -> its blocks; until the request is freed

    @property
    def num_blocks(self) -> int:
        return self.pool.num_blocks

    @property
    def num_free_blocks(self) -> int:
        """Blocks an allocation could take: never used, or cached but unused."""
        return self.pool.num_free_blocks

    @property
    def num_cached_blocks(self) -> int:
        """Blocks registered in the prefix cache, in use or not."""
        return self.pool.num_cached_blocks

    def block_ids(self, request: Request) -> list[int]:
        """A copy of `request`'s block table."""
        blocks = self._requests.get(request.req_id)
        return list(blocks.table) if blocks else []

    def get_computed_blocks(self, request: Request) -> tuple[list[int], int]:
        """The cached blocks holding the longest prefix of `request`'s tokens, and how many tokens
        they hold, for a request being admitted (it holds no blocks). At least one token is left
        out, because the last one must be computed to produce logits. Nothing with prefix caching
        off, or for a request that needs the logits of every prompt token."""
        if not self.enable_prefix_caching or request.needs_prompt_logprobs:
            return [], 0
        token_ids = request.token_ids
        limit = (len(token_ids) - 1) // self.block_size
        hashes = self._requests.setdefault(request.req_id, _RequestBlocks()).hashes
        _extend_hashes(hashes, token_ids, self.block_size, limit)
        blocks = []
        for h in hashes[:limit]:  # a preempted request's hashes may cover its whole sequence
            block_id = self.pool.lookup(h)
            if block_id is None:
                break
            blocks.append(block_id)
        return blocks, len(blocks) * self.block_size

    def allocate_slots(
        self, request: Request, num_new_tokens: int, computed_blocks: Sequence[int] = ()
    ) -> list[int] | None:
        """Make `request`'s blocks cover `num_new_tokens` more tokens after its computed ones and,
        on admission, after the cached `computed_blocks` (from `get_computed_blocks`), which it
        then shares. Returns the blocks appended after those, or None, changing nothing, when
        they do not fit: cached blocks that no request uses count against the free blocks.

        The blocks this fills are offered to the prefix cache right away: in a forward, every
        layer stores the step's K/V before any attention reads the cache, so a request admitted
        in the same step may already share them. Only known tokens can be hashed: a block
        holding a pending token waits until a later allocation.
        """
        blocks = self._requests.get(request.req_id)
        num_held = len(blocks.table) if blocks else 0
        assert not (computed_blocks and num_held), "cached blocks are shared on admission only"
        num_tokens = request.num_computed_tokens + len(computed_blocks) * self.block_size + num_new_tokens
        num_needed = max(0, -(-num_tokens // self.block_size) - num_held - len(computed_blocks))
        if num_needed > self.pool.num_free_blocks - self.pool.num_unused(computed_blocks):
            return None
        blocks = self._requests.setdefault(request.req_id, _RequestBlocks())
        self.pool.share(computed_blocks)
        new_block_ids = self.pool.allocate(num_needed)
        blocks.table += computed_blocks
        blocks.table += new_block_ids
        blocks.num_registered += len(computed_blocks)  # found in the cache: registered already
        self._register_full_blocks(request, blocks, min(num_tokens, request.num_tokens))
        return new_block_ids

    def _register_full_blocks(self, request: Request, blocks: _RequestBlocks, num_tokens: int) -> None:
        """Offer the blocks full of the first `num_tokens` (known, computed) tokens to the cache."""
        num_full = min(num_tokens // self.block_size, len(blocks.table))
        if not self.enable_prefix_caching or num_full <= blocks.num_registered:
            return
        _extend_hashes(blocks.hashes, request.token_ids, self.block_size, num_full)
        for i in range(blocks.num_registered, num_full):
            self.pool.register(blocks.table[i], blocks.hashes[i])
        blocks.num_registered = num_full

    def free(self, request: Request, *, preempted: bool = False) -> None:
        """Give `request`'s blocks back, the last block of its sequence first so that, on
        eviction, a prefix outlives its continuations. A preempted request keeps its hash chain
        to find its own prefix again when readmitted; otherwise the manager forgets it."""
        blocks = self._requests.get(request.req_id) if preempted else self._requests.pop(request.req_id, None)
        if blocks is None:
            return
        self.pool.free(reversed(blocks.table))
        blocks.table, blocks.num_registered = [], 0

    def resize(self, num_blocks: int) -> None:
        """A new, empty pool of `num_blocks` (a restarted shard group sized its cache anew). No
        request may hold blocks; preempted ones keep their hash chains."""
        assert not any(blocks.table for blocks in self._requests.values()), "requests hold blocks"
        self.pool = BlockPool(num_blocks)

    def clear_prefix_cache(self) -> None:
        """Forget every cached prefix; unused cached blocks become plain free blocks."""
        self.pool.clear_hashes()
