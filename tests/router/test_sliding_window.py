"""A model whose every layer has a sliding window: requests give back the blocks behind it.

Window 6, blocks of 4: a query at position p reads p - 5 .. p, so block k (positions 4k .. 4k+3)
is given back once the next token to compute is at 4k + 9 or later.
"""

import pytest

from router.core.kv_cache_manager import PLACEHOLDER_BLOCK, KVCacheManager, max_blocks_held
from router.core.request import Request, RequestStatus, SamplingParams
from router.core.scheduler import Scheduler, SchedulerConfig
from router.limits import Limits, check_pool

BLOCK_SIZE, WINDOW, EOS = 4, 6, 2
P = PLACEHOLDER_BLOCK


def make_request(req_id: int, prompt_len: int, max_new_tokens: int = 4, first: int = 10) -> Request:
    return Request(req_id, list(range(first, first + prompt_len)), max_new_tokens, SamplingParams(), frozenset({EOS}))


def compute(kv: KVCacheManager, request: Request, num_tokens: int, cached=()) -> list[int]:
    """Allocate for `num_tokens` more tokens of `request`, as the scheduler does, and count them computed."""
    new = kv.allocate_slots(request, num_tokens, cached)
    assert new is not None
    request.num_computed_tokens += num_tokens + len(cached) * BLOCK_SIZE
    return new


def make_scheduler(num_blocks: int, prefill_budget: int = 8, prefix_caching: bool = True) -> Scheduler:
    kv = KVCacheManager(num_blocks, BLOCK_SIZE, prefix_caching, sliding_window=WINDOW)
    return Scheduler(SchedulerConfig(8, prefill_budget), kv)


def run_step(s: Scheduler, token: int = 7) -> None:
    plan = s.schedule()
    s.update(plan, {x.request.req_id: token for x in plan.scheduled if x.produces_token})


def test_decoding_gives_back_the_blocks_that_slid_out_of_the_window():
    kv = KVCacheManager(8, BLOCK_SIZE, sliding_window=WINDOW)
    r = make_request(0, 10)
    assert compute(kv, r, 10) == [0, 1, 2]
    held = []
    for token in range(20, 26):  # decode positions 10 .. 15
        r.output_ids.append(token)
        compute(kv, r, 1)
        held.append((kv.block_ids(r), kv.num_held_blocks(r), kv.num_free_blocks))
    assert held == [
        ([P, 1, 2], 2, 6),  # position 10 reads 5 .. 10: block 0 (0 .. 3) is behind
        ([P, 1, 2], 2, 6),
        ([P, 1, 2, 3], 3, 5),  # position 12 needs a fourth block
        ([P, P, 2, 3], 2, 6),  # position 13 reads 8 .. 13: block 1 (4 .. 7) is behind
        ([P, P, 2, 3], 2, 6),
        ([P, P, 2, 3], 2, 6),
    ]
    kv.free(r)
    assert kv.num_free_blocks == 8 and all(c == 0 for c in kv.pool._ref_counts)


def test_a_prompt_chunk_keeps_the_window_of_its_first_token():
    kv = KVCacheManager(8, BLOCK_SIZE, sliding_window=WINDOW)
    r = make_request(0, 24)
    assert compute(kv, r, 8) == [0, 1]
    assert compute(kv, r, 8) == [2, 3] and kv.block_ids(r) == [0, 1, 2, 3]  # position 8 reads 3 .. 8
    assert compute(kv, r, 8) == [4, 5] and kv.block_ids(r) == [P, P, 2, 3, 4, 5]  # position 16 reads 11 ..
    assert kv.num_held_blocks(r) == 4 and kv.num_free_blocks == 4


def test_blocks_given_back_make_room_in_the_same_allocation():
    kv = KVCacheManager(3, BLOCK_SIZE, sliding_window=WINDOW)
    r = make_request(0, 12)
    assert compute(kv, r, 12) == [0, 1, 2] and kv.num_free_blocks == 0
    r.output_ids.append(5)
    # Position 12 needs a fourth block; block 0 (behind 7 .. 12) is given back first and reused.
    assert compute(kv, r, 1) == [0] and kv.block_ids(r) == [P, 1, 2, 0]
    other = make_request(1, 4, first=100)
    assert kv.allocate_slots(other, 4) is None  # all or nothing, as without a window
    assert kv.block_ids(r) == [P, 1, 2, 0] and kv.num_free_blocks == 0


def test_a_request_far_longer_than_the_pool_runs_to_the_end_and_frees_everything():
    s = make_scheduler(num_blocks=6, prefill_budget=8)
    r = make_request(0, 30, max_new_tokens=30)  # 60 tokens: 15 blocks, in a pool of 6
    s.add(r)
    most = 0
    while r.status == RequestStatus.RUNNING or r.status == RequestStatus.WAITING:
        run_step(s)
        most = max(most, s.kv_cache_manager.num_held_blocks(r))
    assert r.status == RequestStatus.FINISHED_LENGTH and len(r.output_ids) == 30 and r.num_preemptions == 0
    assert most == max_blocks_held(r.num_tokens, 8, BLOCK_SIZE, WINDOW) == 4  # (6 + 8 + 2) / 4
    assert s.kv_cache_manager.num_free_blocks == 6 and all(c == 0 for c in s.kv_cache_manager.pool._ref_counts)


@pytest.mark.parametrize("prefix_caching", [True, False])
def test_preempting_and_cancelling_windowed_requests_free_exactly_what_they_hold(prefix_caching):
    s = make_scheduler(num_blocks=5, prefill_budget=16, prefix_caching=prefix_caching)
    kv = s.kv_cache_manager
    old, new = make_request(0, 8, max_new_tokens=20), make_request(1, 8, max_new_tokens=20, first=100)
    s.add(old)
    s.add(new)
    run_step(s)  # both prompts: two blocks each
    run_step(s)  # both decode position 8, which reads 3 ..: each needs a third block, one is left
    assert new.status == RequestStatus.WAITING and new.num_preemptions == 1 and kv.block_ids(new) == []
    assert kv.block_ids(old) == [0, 1, 4] and kv.num_free_blocks == 2
    run_step(s)  # position 9 reads 4 ..: old gives back block 0, and new (9 tokens, 3 blocks) fits again
    assert new.status == RequestStatus.RUNNING and kv.block_ids(old) == [P, 1, 4] and kv.num_free_blocks == 0
    for _ in range(6):
        run_step(s)
    s.finish(old, RequestStatus.FINISHED_ABORTED)  # cancelled with placeholders in its table
    assert kv.num_free_blocks == 5 - kv.num_held_blocks(new)
    while new.status == RequestStatus.RUNNING:
        run_step(s)
    assert new.status == RequestStatus.FINISHED_LENGTH and len(new.output_ids) == 20
    assert kv.num_free_blocks == 5 and all(c == 0 for c in kv.pool._ref_counts) and not kv._requests


def test_a_windowed_request_requeued_when_the_shards_are_lost_starts_over_on_the_new_pool():
    s = make_scheduler(num_blocks=6)
    kv = s.kv_cache_manager
    r = make_request(0, 30, max_new_tokens=10)
    s.add(r)
    for _ in range(4):
        run_step(s)
    assert kv.block_ids(r)[:4] == [P] * 4
    assert s.requeue_all() == [r] and kv.num_free_blocks == 6
    kv.resize(5)  # the restarted shards sized their cache anew
    while not r.status.is_finished:
        run_step(s)
    assert len(r.output_ids) == 10 and r.num_preemptions == 1
    assert kv.num_free_blocks == 5 and all(c == 0 for c in kv.pool._ref_counts)


def test_a_block_given_back_stays_cached_and_a_hit_shares_only_what_its_window_reaches():
    kv = KVCacheManager(16, BLOCK_SIZE, sliding_window=WINDOW)
    a = make_request(0, 16)
    compute(kv, a, 16)
    a.output_ids.append(5)
    compute(kv, a, 1)  # position 16 reads 11 ..: blocks 0 and 1 go back, still cached
    assert kv.block_ids(a) == [P, P, 2, 3, 4] and kv.num_cached_blocks == 4
    b = make_request(1, 18)  # a's 16 prompt tokens, then two of its own
    b.prompt_ids[16:] = [40, 41]
    cached, num_cached = kv.get_computed_blocks(b)
    assert cached == [0, 1, 2, 3] and num_cached == 16
    free = kv.num_free_blocks
    assert compute(kv, b, 2, cached) == [5]  # position 16 reads 11 ..: blocks 2 and 3, shared with a
    assert kv.block_ids(b) == [P, P, 2, 3, 5] and kv.pool._ref_counts[2:4] == [2, 2]
    assert kv.num_free_blocks == free - 1  # blocks 0 and 1 were not revived
    kv.free(a)
    kv.free(b)
    assert kv.num_free_blocks == 16 and all(c == 0 for c in kv.pool._ref_counts)


def test_a_block_given_back_before_its_tokens_are_known_is_never_cached():
    kv = KVCacheManager(8, BLOCK_SIZE, sliding_window=1)  # each query sees itself only
    other = make_request(1, 2, first=100)
    compute(kv, other, 2)  # holds block 0, partial: not cached
    r = make_request(0, 4)
    compute(kv, r, 4)  # block 1, cached; the sampled token (position 4) is pending
    for _ in range(4):  # positions 4 .. 7 scheduled before any of their tokens arrive
        compute(kv, r, 1)
    compute(kv, r, 1)  # position 8: block 2 (4 .. 7) goes back, its tokens unknown
    assert kv.block_ids(r) == [P, P, 3] and kv.num_cached_blocks == 1
    r.output_ids += [20, 21, 22, 23, 24]  # the tokens arrive
    compute(kv, r, 1)  # the next allocation registers what it can, never the placeholder
    follower = make_request(2, 4 + 5 + 1)
    follower.prompt_ids[4:] = [20, 21, 22, 23, 24, 9]
    assert kv.get_computed_blocks(follower)[0] == [1]  # block 2's hash was never registered


@pytest.mark.parametrize("block_size", [1, 2, 4, 16])
def test_max_blocks_held_is_the_exact_bound(block_size):
    for window in range(1, 20):
        for chunk in range(1, 12):
            most = 0
            for start in range(60):  # a step computing start .. start + chunk - 1
                ahead = -(-(start + chunk) // block_size)
                behind = max(0, start - window + 1) // block_size
                most = max(most, ahead - behind)
            assert most == max_blocks_held(10**6, chunk, block_size, window), (window, chunk)
    assert max_blocks_held(10, 8, block_size) == -(-10 // block_size)


def test_the_pool_needs_to_hold_only_what_a_windowed_request_holds_at_once():
    limits = Limits(4095, 4096, 512)
    with pytest.raises(ValueError, match="fewer than --max-total-tokens \\(4096\\):"):
        check_pool(limits, 1024)
    held = max_blocks_held(4096, 512, 16, 256) * 16
    assert held == 784
    check_pool(limits, 1024, held)
    with pytest.raises(ValueError, match="of which a request holds 784 at once"):
        check_pool(limits, 768, held)
