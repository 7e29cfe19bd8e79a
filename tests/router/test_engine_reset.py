"""After a failed step the engine resets the shards within the step timeout, retries a failed
reset before its next step, and fails queued requests instead of letting them hang meanwhile."""

import asyncio

import pytest

from router.core.engine import Engine, GenerationError, Timings
from router.core.kv_cache_manager import KVCacheManager
from router.core.request import GenerationRequest, SamplingParams
from router.core.scheduler import Scheduler, SchedulerConfig
from router.core.shard_client import ShardError, StepResult, TokenResult
from router.metrics import Metrics


class FlakyShards:
    """Fails the first step; then ClearCache fails `failed_resets` times before it succeeds."""

    def __init__(self, failed_resets: int):
        self.failed_resets = failed_resets
        self.resets: list[float | None] = []  # the timeout of each ClearCache call
        self.receives = 0
        self.queue: list[StepResult] = []

    async def send(self, plan, trace_context=None):
        tokens = {s.request.req_id: TokenResult(100, -0.5, []) for s in plan.scheduled if s.produces_token}
        self.queue.append(StepResult(tokens, 1000, 10, {}))

    async def receive(self, timeout_s=None):
        await asyncio.sleep(0)
        self.receives += 1
        if self.receives == 1:
            raise ShardError("UNAVAILABLE: shard gone")
        return self.queue.pop(0)

    async def clear_cache(self, timeout_s=30.0):
        self.resets.append(timeout_s)
        self.queue.clear()
        if len(self.resets) <= self.failed_resets:
            raise ShardError("DEADLINE_EXCEEDED: ClearCache")


async def _outcome(engine: Engine) -> str:
    valid = GenerationRequest([5, 6, 7], SamplingParams(), 2)
    try:
        return f"{len([e async for e in engine.generate(valid, Timings(queued_s=0.0))])} tokens"
    except GenerationError as e:
        return str(e)


@pytest.mark.parametrize("failed_resets", [0, 2])
def test_a_failed_step_resets_the_shards_and_a_failed_reset_is_retried(tiny_tokenizer, failed_resets):
    async def scenario():
        shards = FlakyShards(failed_resets)
        scheduler = Scheduler(SchedulerConfig(8, 64), KVCacheManager(32, 16))
        engine = Engine(scheduler, shards, tiny_tokenizer, [2], Metrics(100, 200), step_timeout_s=7.0)
        task = asyncio.create_task(engine.run())
        outcomes = [await asyncio.wait_for(_outcome(engine), 5) for _ in range(1 + failed_resets + 1)]
        healthy = engine.is_healthy
        task.cancel()
        return outcomes, shards.resets, healthy, scheduler.kv_cache_manager.num_free_blocks

    outcomes, resets, healthy, free_blocks = asyncio.run(scenario())
    assert "shard gone" in outcomes[0]  # the running request fails with the step
    # each later request first retries the reset; while it fails, the request fails too, at once
    assert all("the shards could not be reset" in o for o in outcomes[1:-1]), outcomes
    assert outcomes[-1] == "2 tokens" and healthy
    assert resets == [7.0] * (failed_resets + 1)  # the step timeout bounds every reset
    assert free_blocks == 32


class BrokenEncoding(FlakyShards):
    """The first step cannot even be encoded (a router bug, e.g. a field the protobuf lacks)."""

    def __init__(self):
        super().__init__(failed_resets=0)
        self.sends = 0

    async def send(self, plan, trace_context=None):
        self.sends += 1
        if self.sends == 1:
            raise ValueError("Protocol message NewRequest has no 'num_prompt_tokens' field")
        await super().send(plan, trace_context)

    async def receive(self, timeout_s=None):
        await asyncio.sleep(0)
        return self.queue.pop(0)


def test_an_unexpected_error_in_a_step_fails_its_requests_instead_of_hanging_them(tiny_tokenizer):
    async def scenario():
        shards = BrokenEncoding()
        scheduler = Scheduler(SchedulerConfig(8, 64), KVCacheManager(32, 16))
        engine = Engine(scheduler, shards, tiny_tokenizer, [2], Metrics(100, 200))
        task = asyncio.create_task(engine.run())
        outcomes = [await asyncio.wait_for(_outcome(engine), 5) for _ in range(2)]
        task.cancel()
        return outcomes, shards.resets, scheduler.kv_cache_manager.num_free_blocks

    outcomes, resets, free_blocks = asyncio.run(scenario())
    assert "internal error" in outcomes[0] and "num_prompt_tokens" in outcomes[0]
    assert outcomes[1] == "2 tokens" and len(resets) == 1 and free_blocks == 32
