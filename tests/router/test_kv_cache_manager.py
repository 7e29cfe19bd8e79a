"""The KV cache manager on its own: all-or-nothing allocation, prefix caching, eviction order."""

import pytest

from router.core.block_pool import BlockPool
from router.core.kv_cache_manager import KVCacheManager
from router.core.request import Request, SamplingParams

BLOCK_SIZE = 4


def make_request(req_id: int, prompt: list[int]) -> Request:
    return Request(req_id, list(prompt), 4, SamplingParams())


def admit(kv: KVCacheManager, request: Request) -> tuple[list[int], list[int] | None]:
    """Admit `request` as the scheduler does, computing its whole prompt: (cached blocks, new blocks)."""
    cached, num_cached = kv.get_computed_blocks(request)
    new = kv.allocate_slots(request, request.num_tokens - num_cached, cached)
    if new is not None:
        request.num_computed_tokens = request.num_tokens
    return cached, new


def snapshot(kv: KVCacheManager) -> tuple:
    """Everything the manager and its pool hold."""
    p = kv.pool
    requests = {i: (list(b.table), list(b.hashes), b.num_registered) for i, b in kv._requests.items()}
    return list(p._never_used), list(p._ref_counts), dict(p._hash_of), dict(p._block_of), list(p._evictable), requests


def test_allocate_slots_returns_the_appended_blocks_and_registers_full_ones():
    kv = KVCacheManager(8, BLOCK_SIZE)
    r = make_request(0, range(10, 16))
    assert admit(kv, r) == ([], [0, 1]) and kv.block_ids(r) == [0, 1]
    assert kv.num_cached_blocks == 1  # 6 tokens: one full block
    r.output_ids.append(7)
    assert kv.allocate_slots(r, 1) == [] and kv.num_cached_blocks == 1  # 7 tokens still fit two blocks
    r.num_computed_tokens += 1
    r.output_ids.append(8)
    assert kv.allocate_slots(r, 2) == [2]  # 9 tokens need a third block
    assert kv.num_cached_blocks == 2 and kv.num_free_blocks == 5


def test_a_block_holding_a_pending_token_is_not_registered():
    kv = KVCacheManager(8, BLOCK_SIZE)
    r = make_request(0, range(10, 17))  # 7 tokens, then the 8th is sampled but not known yet
    admit(kv, r)
    assert kv.allocate_slots(r, 1) == [] and kv.num_cached_blocks == 1
    r.num_computed_tokens += 1
    r.output_ids.append(5)  # the token arrives: the next allocation registers the block
    assert kv.allocate_slots(r, 1) == [2] and kv.num_cached_blocks == 2


def test_allocate_slots_that_do_not_fit_change_nothing():
    kv = KVCacheManager(4, BLOCK_SIZE)
    a = make_request(0, range(10, 18))
    admit(kv, a)  # blocks 0 and 1, both registered
    kv.free(a)  # both cached, unused
    b = make_request(1, list(range(10, 18)) + [1] * 9)  # 17 tokens: a's 2 blocks, then 3 more
    cached, num_cached = kv.get_computed_blocks(b)
    assert cached == [0, 1] and num_cached == 8
    before = snapshot(kv)
    assert kv.allocate_slots(b, b.num_tokens - num_cached, cached) is None
    assert snapshot(kv) == before and kv.num_free_blocks == 4
    c = make_request(2, range(50, 55))  # needs 2 blocks; running out in the middle of a request too
    assert admit(kv, c) == ([], [2, 3])
    c.output_ids += [1] * 4
    before = snapshot(kv)
    assert kv.allocate_slots(c, 4 + 3 * BLOCK_SIZE) is None
    assert snapshot(kv) == before


def test_reviving_cached_blocks_counts_against_the_free_blocks():
    prompt = list(range(10, 18))  # two full blocks
    kv = KVCacheManager(4, BLOCK_SIZE)
    first = make_request(0, prompt)
    admit(kv, first)
    kv.free(first)
    longer = make_request(1, prompt + [1] * 8)  # 16 tokens: 2 cached blocks + 2 new ones
    cached, new = admit(kv, longer)
    assert cached == [0, 1] and new == [2, 3] and kv.num_free_blocks == 0
    kv.free(longer)
    # One more block: 4 free blocks, but 2 of them are the cached ones this request revives.
    too_long = make_request(2, prompt + [2] * 9)
    assert admit(kv, too_long) == ([0, 1], None)
    # The same request fits when the cached blocks are in use already: sharing them takes nothing.
    kv = KVCacheManager(5, BLOCK_SIZE)
    admit(kv, make_request(0, prompt))
    cached, new = admit(kv, make_request(2, prompt + [2] * 9))
    assert cached == [0, 1] and new == [2, 3, 4] and kv.num_free_blocks == 0


def test_eviction_takes_never_used_blocks_then_the_least_recently_freed_last_blocks_first():
    kv = KVCacheManager(6, BLOCK_SIZE)
    a, b = make_request(0, range(100, 109)), make_request(1, range(200, 209))  # 9 tokens: 3 blocks each
    for r in (a, b):  # a frees first; its partial third block is not cached
        admit(kv, r)
        kv.free(r)
    assert kv.num_cached_blocks == 4 and kv.num_free_blocks == 6
    other = make_request(2, range(300, 312))  # 3 blocks: the 2 never used, then a's last full block
    admit(kv, other)

    def cached_prefix(request: Request) -> list[int]:
        return kv.get_computed_blocks(make_request(10 + request.req_id, request.prompt_ids))[0]

    assert cached_prefix(a) == [0] and cached_prefix(b) == [3, 4]  # a keeps its first block
    third = make_request(3, range(400, 404))
    admit(kv, third)  # one more: a's first block
    assert cached_prefix(a) == [] and cached_prefix(b) == [3, 4]


def test_the_first_writer_of_a_hash_wins():
    kv = KVCacheManager(8, BLOCK_SIZE)
    prompt = list(range(10, 19))
    first, second = make_request(0, prompt), make_request(1, prompt)
    second.needs_prompt_logprobs = True  # computes everything itself: no prefix-cache hit
    admit(kv, first)
    assert admit(kv, second) == ([], [3, 4, 5])
    assert kv.get_computed_blocks(make_request(2, prompt))[0] == [0, 1]
    kv.free(first)
    kv.free(second)
    assert kv.num_cached_blocks == 2 and kv.num_free_blocks == 8


def test_a_preempted_request_keeps_its_hash_chain_and_finds_its_prefix_again():
    kv = KVCacheManager(8, BLOCK_SIZE)
    r = make_request(0, range(10, 22))  # 12 tokens: 3 full blocks
    admit(kv, r)
    r.output_ids.append(5)
    hashes = list(kv._requests[r.req_id].hashes)
    kv.free(r, preempted=True)
    r.num_computed_tokens = 0
    assert kv.block_ids(r) == [] and kv._requests[r.req_id].hashes == hashes
    cached, new = admit(kv, r)  # 13 tokens: the 3 cached blocks, then the last token
    assert cached == [0, 1, 2] and new == [3] and kv._requests[r.req_id].hashes[:3] == hashes
    kv.free(r)  # finished: forgotten
    assert r.req_id not in kv._requests and kv.num_free_blocks == 8


def test_a_fully_cached_prompt_leaves_its_last_token_to_compute():
    kv = KVCacheManager(8, BLOCK_SIZE)
    prompt = list(range(10, 18))
    admit(kv, make_request(0, prompt))
    assert kv.get_computed_blocks(make_request(1, prompt)) == ([0], 4)


def test_prefix_caching_can_be_switched_off():
    kv = KVCacheManager(8, BLOCK_SIZE, enable_prefix_caching=False)
    prompt = list(range(10, 19))
    admit(kv, make_request(0, prompt))
    assert kv.num_cached_blocks == 0 and kv.get_computed_blocks(make_request(1, prompt)) == ([], 0)


def test_clearing_the_prefix_cache_frees_the_cached_blocks():
    kv = KVCacheManager(4, BLOCK_SIZE)
    r = make_request(0, range(10, 18))
    admit(kv, r)
    kv.free(r)
    kv.clear_prefix_cache()
    assert kv.num_cached_blocks == 0 and kv.num_free_blocks == 4
    assert kv.get_computed_blocks(make_request(1, r.prompt_ids)) == ([], 0)


def test_freeing_a_request_twice_frees_its_blocks_once():
    kv = KVCacheManager(4, BLOCK_SIZE)
    r = make_request(0, range(10, 15))
    admit(kv, r)
    kv.free(r)
    kv.free(r)
    assert kv.num_free_blocks == 4 and all(c == 0 for c in kv.pool._ref_counts)


def test_the_pool_rejects_a_double_free():
    pool = BlockPool(4)
    ids = pool.allocate(2)
    pool.free(ids)
    with pytest.raises(AssertionError):
        pool.free(ids)
