"""One test per scheduling rule, with the shard faked by handing tokens to update()."""

from router.core.kv_cache_manager import KVCacheManager
from router.core.request import Request, RequestStatus, SamplingParams
from router.core.scheduler import Scheduler, SchedulerConfig
from router.core.shard_client import plan_to_pb

EOS = 2


def make_scheduler(
    num_blocks=64, block_size=4, max_batch_size=8, prefill_budget=32, prefix_caching=True, slowdown=2.0, long_prompt=0
) -> Scheduler:
    config = SchedulerConfig(
        max_batch_size, prefill_budget, max_prefill_slowdown=slowdown, long_prompt_tokens=long_prompt
    )
    return Scheduler(config, KVCacheManager(num_blocks, block_size, prefix_caching))


def make_request(req_id, prompt_len, max_new_tokens=4) -> Request:
    return Request(req_id, list(range(10, 10 + prompt_len)), max_new_tokens, SamplingParams(), frozenset({EOS}))


def blocks(scheduler, request) -> list[int]:
    return scheduler.kv_cache_manager.block_ids(request)


def run_step(scheduler, token=7):
    plan = scheduler.schedule()
    produced = scheduler.update(plan, {s.request.req_id: token for s in plan.scheduled if s.produces_token})
    return plan, produced


def test_new_request_is_sent_in_full_then_as_a_delta():
    s = make_scheduler()
    s.add(make_request(0, 6))
    plan, produced = run_step(s)
    (first,) = plan.scheduled
    assert first.is_new and first.num_scheduled_tokens == 6 and first.new_block_ids == [0, 1]
    assert produced[0].output_ids == [7]
    plan, _ = run_step(s)
    (second,) = plan.scheduled
    assert not second.is_new and second.num_scheduled_tokens == 1 and second.new_block_ids == []


def test_blocks_cover_exactly_the_computed_tokens():
    s = make_scheduler(block_size=4)
    s.add(make_request(0, 4, max_new_tokens=10))
    run_step(s)  # 4 prompt tokens: one block
    assert len(blocks(s, s.running[0])) == 1
    plan, _ = run_step(s)  # computing the 5th token needs a second block
    assert plan.scheduled[0].new_block_ids == [1]


def test_prefill_budget_limits_admission_and_chunks_long_prompts():
    s = make_scheduler(prefill_budget=10)
    s.add(make_request(0, 25))
    s.add(make_request(1, 3))
    plan, produced = run_step(s)
    assert [(x.request.req_id, x.num_scheduled_tokens) for x in plan.scheduled] == [(0, 10)]
    assert produced == []  # an unfinished prompt produces no token
    plan, _ = run_step(s)
    assert [(x.request.req_id, x.num_scheduled_tokens) for x in plan.scheduled] == [(0, 10)]
    plan, produced = run_step(s)
    assert [(x.request.req_id, x.num_scheduled_tokens) for x in plan.scheduled] == [(1, 3), (0, 5)]
    assert {r.req_id for r in produced} == {0, 1}


def test_decode_tokens_do_not_consume_the_prefill_budget():
    s = make_scheduler(prefill_budget=8)
    for i in range(3):
        s.add(make_request(i, 8, max_new_tokens=5))
    for _ in range(3):
        run_step(s)
    plan, _ = run_step(s)
    assert [x.num_scheduled_tokens for x in plan.scheduled] == [1, 1, 1]


def test_max_batch_size_bounds_running_requests():
    s = make_scheduler(max_batch_size=2)
    for i in range(3):
        s.add(make_request(i, 2))
    run_step(s)
    assert [r.req_id for r in s.running] == [0, 1] and [r.req_id for r in s.waiting] == [2]


def test_fifo_head_of_queue_is_never_skipped():
    s = make_scheduler(num_blocks=4, block_size=4)
    s.add(make_request(0, 8, max_new_tokens=1))
    blocked = make_request(1, 12)  # needs 3 blocks: waits for request 0
    blocked.prompt_ids = [400 + i for i in range(12)]
    s.add(blocked)
    s.add(make_request(2, 2))  # would fit, but must not overtake request 1
    plan, _ = run_step(s)
    assert [x.request.req_id for x in plan.scheduled] == [0]
    assert [r.req_id for r in s.waiting] == [1, 2]


def test_length_finishes_before_eos_and_frees_blocks():
    s = make_scheduler()
    s.add(make_request(0, 3, max_new_tokens=1))
    _, produced = run_step(s, token=EOS)
    assert produced[0].status == RequestStatus.FINISHED_LENGTH
    assert s.kv_cache_manager.num_free_blocks == 64 and not s.running


def test_eos_finishes_and_is_forgotten_with_the_next_step():
    s = make_scheduler()
    s.add(make_request(0, 3))
    run_step(s)
    _, produced = run_step(s, token=EOS)
    assert produced[0].status == RequestStatus.FINISHED_EOS
    s.add(make_request(1, 3))  # a step that is sent carries the forget
    assert s.schedule().forget_req_ids == [0]


def test_ignore_eos_keeps_generating():
    s = make_scheduler()
    r = make_request(0, 3)
    r.ignore_eos = True
    s.add(r)
    for _ in range(4):
        run_step(s, token=EOS)
    assert r.status == RequestStatus.FINISHED_LENGTH and len(r.output_ids) == 4


def test_preemption_evicts_the_newest_and_readmits_it_first():
    s = make_scheduler(num_blocks=4, block_size=4, prefill_budget=64, prefix_caching=False)
    old, new = make_request(0, 7, max_new_tokens=8), make_request(1, 8, max_new_tokens=8)
    s.add(old)
    s.add(new)
    run_step(s)  # old: 2 blocks, new: 2 blocks, pool empty
    plan, _ = run_step(s)  # old's 8th token fits; new's 9th needs a block: new, the newest, yields
    assert new.status == RequestStatus.WAITING and new.num_computed_tokens == 0 and blocks(s, new) == []
    assert s.waiting[0] is new and new.num_preemptions == 1
    assert [x.request.req_id for x in plan.scheduled] == [0]
    assert plan.forget_req_ids == [1]  # the shards drop it before computing this very step
    while old.status == RequestStatus.RUNNING:
        run_step(s)
    plan = s.schedule()
    (again,) = plan.scheduled  # readmitted in full: prompt plus the token it had generated
    assert again.is_new and again.request is new and again.num_scheduled_tokens == new.num_tokens == 8 + 1
    # The shards are told which of those tokens are the prompt: the penalties still count the
    # generated one as generated (tests/shard/test_resume_after_preemption.py).
    (sent,) = plan_to_pb(plan).new_requests
    assert list(sent.token_ids) == new.token_ids and sent.num_prompt_tokens == 8


def test_abort_frees_blocks_of_running_and_removes_waiting():
    s = make_scheduler(max_batch_size=1)
    running, waiting = make_request(0, 5), make_request(1, 5)
    s.add(running)
    s.add(waiting)
    run_step(s)
    s.finish(running, RequestStatus.FINISHED_ABORTED)
    s.finish(waiting, RequestStatus.FINISHED_ABORTED)
    assert s.kv_cache_manager.num_free_blocks == 64 and not s.running and not s.waiting
    s.add(make_request(2, 3))
    assert s.schedule().forget_req_ids == [0]


def test_tokens_of_a_request_aborted_during_the_step_are_dropped():
    s = make_scheduler()
    r = make_request(0, 3)
    s.add(r)
    plan = s.schedule()
    s.finish(r, RequestStatus.FINISHED_ABORTED)
    assert s.update(plan, {0: 5}) == [] and r.output_ids == []


def test_min_new_tokens_defers_eos():
    s = make_scheduler()
    r = make_request(0, 3, max_new_tokens=10)
    r.min_new_tokens = 3
    s.add(r)
    for _ in range(2):
        run_step(s, token=EOS)
    assert r.status == RequestStatus.RUNNING
    run_step(s, token=EOS)
    assert r.status == RequestStatus.FINISHED_EOS and len(r.output_ids) == 3


def test_stop_token_ids_finish_after_min_new_tokens_even_when_eos_is_ignored():
    s = make_scheduler()
    r = make_request(0, 3, max_new_tokens=10)
    r.stop_token_ids, r.ignore_eos, r.min_new_tokens = frozenset({9}), True, 2
    s.add(r)
    run_step(s, token=9)
    assert r.status == RequestStatus.RUNNING
    run_step(s, token=9)
    assert r.status == RequestStatus.FINISHED_STOP_SEQUENCE and r.output_ids == [9, 9]


def test_a_completed_grammar_finishes_its_request_only():
    s = make_scheduler()
    done, other = make_request(0, 3, max_new_tokens=10), make_request(1, 3, max_new_tokens=10)
    s.add(done)
    s.add(other)
    plan = s.schedule()
    s.update(plan, {0: 7, 1: 7}, grammar_completed=frozenset({0}))
    assert done.status == RequestStatus.FINISHED_EOS and done.output_ids == [7]
    assert other.status == RequestStatus.RUNNING and s.kv_cache_manager.block_ids(done) == []


def run_to_completion(s):
    while s.has_work:
        run_step(s)


def test_prefix_hit_skips_computed_tokens():
    s = make_scheduler(block_size=4)
    first = make_request(0, 10, max_new_tokens=1)
    s.add(first)
    run_to_completion(s)
    second = Request(1, first.prompt_ids[:8] + [99, 98, 97], 1, SamplingParams(), frozenset({EOS}))
    s.add(second)
    (scheduled,) = s.schedule().scheduled
    assert scheduled.start_position == 8 and scheduled.num_scheduled_tokens == 3
    assert blocks(s, second)[:2] == [0, 1]  # the first request's two full blocks
    assert s.num_prefix_hit_tokens == 8


def test_running_requests_share_prefix_blocks_by_reference():
    s = make_scheduler(block_size=4)
    a = make_request(0, 9, max_new_tokens=5)
    s.add(a)
    run_step(s)
    b = make_request(1, 9, max_new_tokens=5)
    s.add(b)
    run_step(s)
    assert blocks(s, b)[:2] == blocks(s, a)[:2] and b.num_computed_tokens == 9
    s.finish(a, RequestStatus.FINISHED_ABORTED)
    run_to_completion(s)  # b still reads the shared blocks after a is gone
    assert b.status == RequestStatus.FINISHED_LENGTH and s.kv_cache_manager.num_free_blocks == 64


def test_a_fully_cached_prompt_still_computes_its_last_token():
    s = make_scheduler(block_size=4)
    s.add(make_request(0, 8, max_new_tokens=1))
    run_to_completion(s)
    again = make_request(1, 8, max_new_tokens=1)
    s.add(again)
    (scheduled,) = s.schedule().scheduled
    assert scheduled.start_position == 4 and scheduled.num_scheduled_tokens == 4


def test_cached_blocks_are_evicted_least_recently_freed_first():
    s = make_scheduler(num_blocks=6, block_size=4)
    a, b = make_request(0, 9, max_new_tokens=1), make_request(1, 9, max_new_tokens=1)
    b.prompt_ids = [200 + i for i in range(9)]
    for r in (a, b):  # a frees its blocks first
        s.add(r)
        run_to_completion(s)
    assert s.kv_cache_manager.num_cached_blocks == 4 and s.kv_cache_manager.num_free_blocks == 6
    other = make_request(2, 16, max_new_tokens=1)
    other.prompt_ids = [500 + i for i in range(16)]
    s.add(other)  # needs 4 blocks: the 2 never used, then a's 2 cached ones
    s.schedule()
    cached = [
        s.kv_cache_manager.get_computed_blocks(Request(10 + r.req_id, r.prompt_ids, 1, SamplingParams()))[0]
        for r in (a, b)
    ]
    assert cached[0] == [] and len(cached[1]) == 2


def test_prefix_caching_can_be_switched_off():
    s = make_scheduler(prefix_caching=False)
    s.add(make_request(0, 9, max_new_tokens=1))
    run_to_completion(s)
    again = make_request(1, 9, max_new_tokens=1)
    s.add(again)
    (scheduled,) = s.schedule().scheduled
    assert scheduled.start_position == 0 and s.kv_cache_manager.num_cached_blocks == 0


def test_preempted_request_reuses_its_own_cached_prefix():
    s = make_scheduler(num_blocks=4, block_size=4, prefill_budget=64)
    old, new = make_request(0, 7, max_new_tokens=3), make_request(1, 8, max_new_tokens=8)
    new.prompt_ids = [300 + i for i in range(8)]
    s.add(old)
    s.add(new)
    run_step(s)
    run_step(s)  # new is preempted; its two full blocks stay cached
    assert new.status == RequestStatus.WAITING
    while old.status == RequestStatus.RUNNING:
        run_step(s)  # old takes one more block: the cache evicts new's last block, not its first
    (again,) = s.schedule().scheduled
    assert again.request is new and again.start_position == 4 and again.num_scheduled_tokens == 9 - 4


def test_requests_arriving_together_compute_a_shared_prefix_once():
    s = make_scheduler(block_size=4, prefill_budget=100)
    system = [700 + i for i in range(12)]
    requests = [Request(i, system + [i], 1, SamplingParams(), frozenset({EOS})) for i in range(4)]
    for r in requests:
        s.add(r)
    plan = s.schedule()
    assert [x.num_scheduled_tokens for x in plan.scheduled] == [13, 1, 1, 1]
    assert all(blocks(s, r)[:3] == blocks(s, requests[0])[:3] for r in requests)


def test_a_failed_step_ends_running_requests_and_clears_the_prefix_cache():
    s = make_scheduler()
    s.add(make_request(0, 9))
    run_step(s)
    s.add(make_request(1, 9))
    (failed,) = s.fail_all()
    assert failed.status == RequestStatus.FINISHED_ERROR
    assert s.kv_cache_manager.num_cached_blocks == 0 and s.kv_cache_manager.num_free_blocks == 64
    (again,) = s.schedule().scheduled  # the waiting request computes everything again
    assert again.num_scheduled_tokens == 9


def test_waiting_served_ratio_holds_admission_until_enough_wait_or_max_waiting_tokens():
    s = Scheduler(SchedulerConfig(8, 64, waiting_served_ratio=0.5, max_waiting_tokens=3), KVCacheManager(64, 4))
    for i in range(4):
        s.add(make_request(i, 2, max_new_tokens=20))
    run_step(s)  # nothing runs yet: all four are admitted
    s.add(make_request(4, 2, max_new_tokens=20))  # 1 waiting < 0.5 * 4 running
    for _ in range(3):
        plan, _ = run_step(s)
        assert all(not x.is_new for x in plan.scheduled)
    plan, _ = run_step(s)  # the 4th step without admission lets it in
    assert [x.request.req_id for x in plan.scheduled if x.is_new] == [4]
    s.add(make_request(5, 2))
    s.add(make_request(6, 2))
    s.add(make_request(7, 2))  # 3 waiting >= 0.5 * 5 running: admitted at once
    plan, _ = run_step(s)
    assert [x.request.req_id for x in plan.scheduled if x.is_new] == [5, 6, 7]


def test_forgotten_ids_wait_for_a_step_that_is_sent():
    s = make_scheduler()
    r = make_request(0, 3, max_new_tokens=1)
    s.add(r)
    run_step(s)  # finished by length
    assert s.schedule().is_empty  # nothing to send: the forget must not be lost
    s.add(make_request(1, 3))
    assert s.schedule().forget_req_ids == [0]


def test_a_step_can_be_scheduled_before_the_previous_result():
    s = make_scheduler()
    r = make_request(0, 5, max_new_tokens=3)
    s.add(r)
    first = s.schedule()  # prefill, samples token 1
    second = s.schedule()  # decodes token 1 (held by the shard), samples token 2
    third = s.schedule()  # decodes token 2, samples token 3: the last one
    assert [x.num_scheduled_tokens for p in (first, second, third) for x in p.scheduled] == [5, 1, 1]
    assert s.schedule().is_empty and r.num_pending_outputs == 3  # length is reached by pending tokens
    for plan, token in ((first, 11), (second, EOS), (third, 13)):
        s.update(plan, {0: token})
    assert r.output_ids == [11, EOS] and r.status == RequestStatus.FINISHED_EOS  # 13 came after EOS: dropped
    assert s.kv_cache_manager.num_free_blocks == 64


def test_a_preempted_request_whose_hashes_cover_its_whole_sequence_still_computes_a_token():
    """Found by the property test: a request hashed all its blocks, then was preempted while its
    token was in flight (a 12-token prompt in blocks of 4). Matching its prefix again must still
    leave a token to compute: it used to be sent with none, which the shard refuses."""
    s = make_scheduler(block_size=4)
    r = make_request(0, 12, max_new_tokens=2)
    s.add(r)
    plan = s.schedule()  # computes the 12 prompt tokens, registering the 3 full blocks
    assert s.kv_cache_manager.num_cached_blocks == 3
    s._preempt(r)
    assert s.update(plan, {0: 7}) == []  # the token of the preempted incarnation is dropped
    (again,) = s.schedule().scheduled
    assert again.is_new and again.start_position == 8 and again.num_scheduled_tokens == 4


def _trained(s: Scheduler, fixed=0.010, per_token=0.001, per_attention=0.0) -> Scheduler:
    """Feed the step cost model exact step times of a known model (seconds)."""
    from router.core.step_cost import StepWork

    for tokens, attention in [(1, 10), (32, 3000), (8, 400), (200, 20000), (64, 900), (3, 50)] * 4:
        s.step_costs.observe(StepWork(tokens, attention), fixed + per_token * tokens + per_attention * attention)
    return s


def test_while_requests_decode_prompt_chunks_fit_the_slowdown_allowance():
    # 10 ms per step plus 1 ms per token: 4 decodes take 14 ms; with slowdown 3 a chunk may add
    # 2 x 14 = 28 ms, i.e. 28 tokens. Without decodes the whole budget is used.
    s = _trained(make_scheduler(num_blocks=200, prefill_budget=512, max_batch_size=16, slowdown=3))
    for i in range(4):
        s.add(make_request(i, 8, max_new_tokens=50))
    run_step(s)
    s.add(make_request(9, 400))
    plan, _ = run_step(s)
    assert sorted(x.num_scheduled_tokens for x in plan.scheduled) == [1, 1, 1, 1, 28]
    plan, _ = run_step(s)
    assert sorted(x.num_scheduled_tokens for x in plan.scheduled) == [1, 1, 1, 1, 28]
    alone = _trained(make_scheduler(num_blocks=200, prefill_budget=512))
    alone.add(make_request(0, 400))
    plan, _ = run_step(alone)
    assert [x.num_scheduled_tokens for x in plan.scheduled] == [400]


def test_short_prompts_go_in_whole_while_requests_decode():
    s = _trained(
        make_scheduler(
            num_blocks=200, prefill_budget=512, max_batch_size=16, prefix_caching=False, slowdown=3, long_prompt=100
        )
    )
    for i in range(4):
        s.add(make_request(i, 8, max_new_tokens=50))
    run_step(s)
    s.add(make_request(8, 100))  # not over the threshold: whole
    s.add(make_request(9, 400))  # long: what the allowance leaves (28 - 100 < 0: nothing)
    plan, _ = run_step(s)
    assert sorted(x.num_scheduled_tokens for x in plan.scheduled) == [1, 1, 1, 1, 100]


def test_a_prompt_advances_by_at_least_a_minimum_chunk_and_the_limit_can_be_lifted():
    slow = _trained(make_scheduler(num_blocks=200, prefill_budget=512), per_token=1.0)  # 1 s per token
    for i in range(2):
        slow.add(make_request(i, 8, max_new_tokens=50))
    run_step(slow)
    slow.add(make_request(8, 300))
    slow.add(make_request(9, 300))
    plan, _ = run_step(slow)
    assert sorted(x.num_scheduled_tokens for x in plan.scheduled) == [1, 1, 16]  # only the first chunk
    free = _trained(make_scheduler(num_blocks=200, prefill_budget=512, prefix_caching=False, slowdown=0), per_token=1.0)
    free.add(make_request(0, 8, max_new_tokens=50))
    run_step(free)
    free.add(make_request(9, 300))
    plan, _ = run_step(free)
    assert sorted(x.num_scheduled_tokens for x in plan.scheduled) == [1, 300]


def test_a_burst_of_arrivals_shares_the_allowance_by_request_count():
    # 2 requests decode (12 ms predicted); 8 prompts wait: their chunks may add 4 x (2 - 1) x 12 ms.
    s = _trained(make_scheduler(num_blocks=400, prefill_budget=2048, max_batch_size=16, prefix_caching=False))
    for i in range(2):
        s.add(make_request(i, 8, max_new_tokens=50))
    run_step(s)
    for i in range(8):
        s.add(make_request(10 + i, 40))
    plan, _ = run_step(s)
    chunks = [x.num_scheduled_tokens for x in plan.scheduled if x.num_scheduled_tokens > 1]
    assert sum(chunks) == 48  # 48 ms at 1 ms a token: all of the first prompt, 8 of the second
