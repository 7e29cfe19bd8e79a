"""The engine sends step N+1 before it reads step N's result, and outputs are unchanged."""

import asyncio
from collections import deque

import pytest

from router.core.engine import Engine, Timings
from router.core.kv_cache_manager import KVCacheManager
from router.core.request import GenerationRequest, SamplingParams
from router.core.scheduler import Scheduler, SchedulerConfig
from router.core.shard_client import StepResult, TokenResult
from router.metrics import Metrics


class FakeShards:
    """Answers steps in order; the token sampled is 100 + the sequence length (never EOS)."""

    def __init__(self):
        self.log: list[str] = []
        self.queue: deque = deque()
        self.lengths: dict[int, int] = {}

    async def send(self, plan, trace_context=None):
        self.log.append(f"send {plan.step_id}")
        tokens = {}
        for s in plan.scheduled:
            self.lengths[s.request.req_id] = s.start_position + s.num_scheduled_tokens
            if s.produces_token:
                tokens[s.request.req_id] = TokenResult(100 + self.lengths[s.request.req_id], -0.5, [])
        self.queue.append((plan.step_id, StepResult(tokens, 1000, 10, {})))

    async def receive(self, timeout_s=None):
        await asyncio.sleep(0.001)
        step_id, result = self.queue.popleft()
        self.log.append(f"receive {step_id}")
        return result


async def _generate(tokenizer, max_steps_in_flight: int) -> tuple[list[int], list[str]]:
    shards = FakeShards()
    scheduler = Scheduler(SchedulerConfig(8, 64), KVCacheManager(32, 16))
    engine = Engine(scheduler, shards, tokenizer, [2], Metrics(100, 200), max_steps_in_flight=max_steps_in_flight)
    task = asyncio.create_task(engine.run())
    valid = GenerationRequest([5, 6, 7], SamplingParams(), 5)
    ids = [e.token.id async for e in engine.generate(valid, Timings(queued_s=0.0))]
    task.cancel()
    return ids, shards.log


@pytest.mark.parametrize("max_steps_in_flight", [1, 2])
def test_outputs_do_not_depend_on_overlap(tiny_tokenizer, max_steps_in_flight):
    ids, _ = asyncio.run(_generate(tiny_tokenizer, max_steps_in_flight))
    assert ids == [103, 104, 105, 106, 107]


def test_the_next_step_is_sent_before_the_previous_result_is_read(tiny_tokenizer):
    _, log = asyncio.run(_generate(tiny_tokenizer, 2))
    assert log[:4] == ["send 0", "send 1", "receive 0", "send 2"]
    assert log.count("send 5") == 0  # the 5th token was in flight: no step beyond max_new_tokens
