"""The router's KV cache manager: the one source of truth for shard memory.

It owns each request's block table (block i holds the K/V of tokens [i * block_size,
(i + 1) * block_size)) and the chained hashes of its full blocks, keyed by request id; the
scheduler only asks. A block whose tokens are all known and computed gets a hash chained from
its predecessor's, so equal hashes mean equal prefixes; the pool (block_pool.py) keeps hashed
blocks cached after their last user frees them. `allocate_slots` is all or nothing: there is
no separate check to forget before allocating.

With a sliding window over every layer (the shards' Info says so), a query at position p reads
only positions p - window + 1 .. p, so a request gives back each leading block once every
position in it is `window` or more behind the next token to compute (for a prompt chunk: its
first token): a request holds about window + chunk tokens of blocks, however long it grows. Its
block table keeps its length, the entries given back reading PLACEHOLDER_BLOCK, which attention
never reads. Prefix caching stays exact: a block given back keeps its registration (its K/V are
those of its hash's prefix), so, like any cached block, it is reused until evicted; a lookup
still needs the whole chain from the first block; a request admitted on a hit shares only the
cached blocks its window reaches; a block given back before it was registered (a token in it was
still pending) is never registered.

An encoder-decoder model's request also holds blocks for its encoder input (the cross-attention
K/V every decoder layer reads), taken with its first allocation and given back with the rest. Its
decoder's K/V depend on that input, so such a request neither finds nor offers cached prefixes.
"""

from collections.abc import Sequence
from dataclasses import dataclass, field
from hashlib import blake2b

from router.core.block_pool import BlockPool
from router.core.request import Request

PLACEHOLDER_BLOCK = 0  # the block table's entry for a block that slid out of the window: never read


def max_blocks_held(num_tokens: int, max_chunk_tokens: int, block_size: int, sliding_window: int = 0) -> int:
    """The most blocks a request of `num_tokens` tokens holds at once, computing at most
    `max_chunk_tokens` per step: blocks for all its tokens, or, with a sliding window, at most
    for the window before a step's first token, that step's tokens, and one partial block."""
    num_blocks = -(-num_tokens // block_size)
    if not sliding_window:
        return num_blocks
    return min(num_blocks, -(-(sliding_window + max_chunk_tokens + block_size - 2) // block_size))


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
    num_dropped: int = 0  # leading blocks of `table` given back (slid out of the window): PLACEHOLDER_BLOCK
    encoder: list[int] = field(default_factory=list)  # blocks of an encoder-decoder request's encoder input


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True, sliding_window: int = 0):
        """`sliding_window` > 0: every layer of the model attends only to that many last positions."""
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.sliding_window = sliding_window
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
        """A copy of `request`'s block table (PLACEHOLDER_BLOCK where blocks slid out of the window)."""
        blocks = self._requests.get(request.req_id)
        return list(blocks.table) if blocks else []

    def encoder_block_ids(self, request: Request) -> list[int]:
        """A copy of the blocks of `request`'s encoder input (encoder-decoder models; else empty)."""
        blocks = self._requests.get(request.req_id)
        return list(blocks.encoder) if blocks else []

    def num_held_blocks(self, request: Request) -> int:
        """Blocks `request` holds: its block table but for the entries that slid out of the window,
        and its encoder's blocks."""
        blocks = self._requests.get(request.req_id)
        return len(blocks.table) - blocks.num_dropped + len(blocks.encoder) if blocks else 0

    def _num_out_of_window(self, position: int) -> int:
        """Leading blocks no query at `position` or after reads: each of their positions is at
        least `sliding_window` behind it; none without a window."""
        if not self.sliding_window:
            return 0
        return max(0, position - self.sliding_window + 1) // self.block_size

    def get_computed_blocks(self, request: Request) -> tuple[list[int], int]:
        """The cached blocks holding the longest prefix of `request`'s tokens, and how many tokens
        they hold, for a request being admitted (it holds no blocks). At least one token is left
        out, because the last one must be computed to produce logits. Nothing with prefix caching
        off, or for a request that needs the logits of every prompt token."""
        if not self.enable_prefix_caching or request.needs_prompt_logprobs or request.encoder_ids:
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

        With a sliding window, the leading blocks that the step's first token no longer reaches
        are given back first (their entries become PLACEHOLDER_BLOCK; they count as free in the
        fit), and on admission the cached blocks it does not reach are not shared at all.

        The blocks this fills are offered to the prefix cache right away: in a forward, every
        layer stores the step's K/V before any attention reads the cache, so a request admitted
        in the same step may already share them. Only known tokens can be hashed: a block
        holding a pending token waits until a later allocation.
        """
        blocks = self._requests.get(request.req_id)
        num_held = len(blocks.table) if blocks else 0
        assert not (computed_blocks and num_held), "cached blocks are shared on admission only"
        start = request.num_computed_tokens + len(computed_blocks) * self.block_size  # the step's first token
        num_tokens = start + num_new_tokens
        if (  # most decode steps: the tokens fit in the blocks held, none to give back or allocate
            num_tokens <= num_held * self.block_size
            and (blocks.encoder or not request.encoder_ids)
            and self._num_out_of_window(start) <= blocks.num_dropped
        ):
            self._register_full_blocks(request, blocks, min(num_tokens, request.num_tokens))
            return []
        num_needed = max(0, -(-num_tokens // self.block_size) - num_held - len(computed_blocks))
        num_encoder = -(-len(request.encoder_ids) // self.block_size) if not (blocks and blocks.encoder) else 0
        num_out = self._num_out_of_window(start)
        shared = computed_blocks[num_out:]
        dropped = blocks.table[blocks.num_dropped : num_out] if blocks else []
        available = self.pool.num_free_blocks + self.pool.num_sole_users(dropped) - self.pool.num_unused(shared)
        if num_needed + num_encoder > available:
            return None
        blocks = self._requests.setdefault(request.req_id, _RequestBlocks())
        self.pool.free(reversed(dropped))
        blocks.table[blocks.num_dropped : num_out] = [PLACEHOLDER_BLOCK] * len(dropped)
        self.pool.share(shared)
        new_block_ids = self.pool.allocate(num_needed)
        blocks.encoder += self.pool.allocate(num_encoder)
        blocks.table += [PLACEHOLDER_BLOCK] * (len(computed_blocks) - len(shared))
        blocks.table += shared
        blocks.table += new_block_ids
        blocks.num_dropped = max(blocks.num_dropped, num_out)
        blocks.num_registered += len(computed_blocks)  # found in the cache: registered already
        self._register_full_blocks(request, blocks, min(num_tokens, request.num_tokens))
        return new_block_ids

    def _register_full_blocks(self, request: Request, blocks: _RequestBlocks, num_tokens: int) -> None:
        """Offer the blocks full of the first `num_tokens` (known, computed) tokens to the cache,
        but for those given back already (a placeholder is no block of this request's)."""
        num_full = min(num_tokens // self.block_size, len(blocks.table))
        first = max(blocks.num_registered, blocks.num_dropped)
        if not self.enable_prefix_caching or request.encoder_ids or num_full <= first:
            return
        _extend_hashes(blocks.hashes, request.token_ids, self.block_size, num_full)
        for i in range(first, num_full):
            self.pool.register(blocks.table[i], blocks.hashes[i])
        blocks.num_registered = num_full

    def free(self, request: Request, *, preempted: bool = False) -> None:
        """Give `request`'s blocks back, the last block of its sequence first so that, on
        eviction, a prefix outlives its continuations. A preempted request keeps its hash chain
        to find its own prefix again when readmitted; otherwise the manager forgets it."""
        blocks = self._requests.get(request.req_id) if preempted else self._requests.pop(request.req_id, None)
        if blocks is None:
            return
        self.pool.free(reversed(blocks.table[blocks.num_dropped :]))
        self.pool.free(reversed(blocks.encoder))
        blocks.table, blocks.num_registered, blocks.num_dropped, blocks.encoder = [], 0, 0, []

    def resize(self, num_blocks: int) -> None:
        """A new, empty pool of `num_blocks` (a restarted shard group sized its cache anew). No
        request may hold blocks; preempted ones keep their hash chains."""
        assert not any(b.table or b.encoder for b in self._requests.values()), "requests hold blocks"
        self.pool = BlockPool(num_blocks)

    def clear_prefix_cache(self) -> None:
        """Forget every cached prefix; unused cached blocks become plain free blocks."""
        self.pool.clear_hashes()
