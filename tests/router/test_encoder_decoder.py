"""Encoder-decoder requests (T5) in the scheduler: encoder blocks taken with the first allocation,
sent once with the request, given back on finish and preemption; the encoder's tokens count
against the prefill budget; no prefix cache."""

from router.core.kv_cache_manager import KVCacheManager
from router.core.request import Request, RequestStatus, SamplingParams
from router.core.scheduler import Scheduler, SchedulerConfig
from router.core.shard_client import plan_to_pb

START, EOS = 0, 2


def make_scheduler(num_blocks=16, prefill_budget=32) -> Scheduler:
    return Scheduler(SchedulerConfig(8, prefill_budget), KVCacheManager(num_blocks, 4, enable_prefix_caching=True))


def seq2seq(req_id: int, encoder_len: int, max_new_tokens: int = 4) -> Request:
    encoder_ids = list(range(10, 10 + encoder_len))
    return Request(req_id, [START], max_new_tokens, SamplingParams(), frozenset({EOS}), encoder_ids=encoder_ids)


def step(s: Scheduler, token: int = 7):
    plan = s.schedule()
    s.update(plan, {x.request.req_id: token for x in plan.scheduled if x.produces_token})
    return plan


def test_encoder_blocks_come_with_the_request_and_go_back_when_it_finishes():
    s = make_scheduler()
    r = seq2seq(0, encoder_len=9, max_new_tokens=4)
    s.add(r)
    plan = s.schedule()
    (first,) = plan.scheduled
    assert first.is_new and first.num_scheduled_tokens == 1  # the decoder's start token
    assert first.new_block_ids == [0] and first.encoder_block_ids == [1, 2, 3]  # 9 tokens in blocks of 4
    (msg,) = plan_to_pb(plan).new_requests
    assert list(msg.encoder_token_ids) == r.encoder_ids and list(msg.encoder_block_ids) == [1, 2, 3]
    assert list(msg.token_ids) == [START] and msg.num_prompt_tokens == 1
    s.update(plan, {0: 7})
    assert s.kv_cache_manager.num_held_blocks(r) == 4
    for _ in range(3):
        (running,) = step(s).scheduled
        assert not running.is_new and running.num_scheduled_tokens == 1
    assert r.status == RequestStatus.FINISHED_LENGTH and r.output_ids == [7] * 4
    assert s.kv_cache_manager.num_free_blocks == 16


def test_the_encoder_input_takes_its_share_of_the_prefill_budget():
    s = make_scheduler(prefill_budget=20)
    for i in range(3):
        s.add(seq2seq(i, encoder_len=9))
    plan = s.schedule()
    assert [x.request.req_id for x in plan.scheduled] == [0, 1]  # 2 x (9 + 1) tokens
    plan = s.schedule()
    assert [x.request.req_id for x in plan.scheduled if x.is_new] == [2]


def test_an_encoder_input_longer_than_the_budget_is_still_admitted_alone():
    s = make_scheduler(prefill_budget=8)
    s.add(seq2seq(0, encoder_len=12))
    (first,) = s.schedule().scheduled
    assert first.num_scheduled_tokens == 1 and len(first.encoder_block_ids) == 3


def test_preemption_gives_the_encoder_blocks_back_and_readmission_sends_them_again():
    s = make_scheduler(num_blocks=6)
    a, b = seq2seq(0, encoder_len=8, max_new_tokens=12), seq2seq(1, encoder_len=8, max_new_tokens=12)
    s.add(a)
    s.add(b)
    step(s)  # each holds 2 encoder blocks and 1 decoder block: the pool is full
    for _ in range(3):
        step(s)  # decoder sequences of 4 tokens
    plan = step(s)  # the 5th token needs a block: the newest request is preempted
    assert b.status == RequestStatus.WAITING and b.num_preemptions == 1
    assert s.kv_cache_manager.num_held_blocks(b) == 0 and s.kv_cache_manager.num_held_blocks(a) == 4
    assert [x.request.req_id for x in plan.scheduled] == [0]
    while a.status == RequestStatus.RUNNING:
        step(s)
    plan = s.schedule()
    (again,) = plan.scheduled
    assert again.is_new and again.request is b and len(again.encoder_block_ids) == 2
    assert again.num_scheduled_tokens == len(b.token_ids)  # the decoder's start and outputs, recomputed
    (msg,) = plan_to_pb(plan).new_requests
    assert list(msg.encoder_token_ids) == b.encoder_ids


def test_seq2seq_requests_neither_find_nor_offer_cached_prefixes():
    s = make_scheduler()
    a, b = seq2seq(0, encoder_len=8), seq2seq(1, encoder_len=8)
    a.prompt_ids = b.prompt_ids = [START] * 9  # a decoder prefix that decoder-only requests would share
    s.add(a)
    step(s)
    assert s.kv_cache_manager.num_cached_blocks == 0
    s.add(b)
    plan = s.schedule()
    assert all(x.start_position == 0 for x in plan.scheduled if x.is_new)
