"""Losing the shards: with `reconnect` (the launcher restarts them) the requests in flight are recomputed and
continue token for token once the shards are back, in a KV pool of the new size; without it, or when the
shards do not come back, or when the server stops meanwhile, every request fails with an error."""

import asyncio

import pytest

from router.core.engine import Engine, GenerationError, ShardsNotBack, Timings
from router.core.kv_cache_manager import KVCacheManager
from router.core.request import GenerationRequest, SamplingParams
from router.core.scheduler import Scheduler, SchedulerConfig
from router.core.shard_client import ShardError, StepResult, TokenResult
from router.metrics import Metrics

PROMPTS = [[5, 6, 7], [8, 9, 10, 11, 12], [13] * 20]
MAX_NEW_TOKENS = 12


class Shards:
    """Shards whose next token is a function of the whole sequence (as greedy decoding is), so a request
    recomputed from its prompt and generated tokens continues as it would have. `lose_at`: the receive
    (1-based) at which they are lost (UNAVAILABLE), after which every call fails until `come_back`."""

    def __init__(self, lose_at: int | None = None, first_error_from_survivor: bool = False):
        self.lose_at = lose_at
        self.first_error_from_survivor = first_error_from_survivor
        self.gone = False
        self.receives = 0
        self.queue: list[StepResult] = []
        self.history: dict[int, list[int]] = {}
        self.recomputed: list[list[int]] = []  # the token_ids of requests sent anew after the loss

    def _check(self) -> None:
        if self.gone:
            raise ShardError("shard unix:///s-1: Socket closed", lost=True)

    async def send(self, plan, trace_context=None):
        self._check()
        tokens = {}
        for s in plan.scheduled:
            req_id = s.request.req_id
            if s.is_new:
                self.history[req_id] = list(s.request.token_ids)
                if self.receives >= (self.lose_at or 1 << 30):
                    self.recomputed.append(list(s.request.token_ids))
            end = s.start_position + s.num_scheduled_tokens
            if s.produces_token:
                sequence = self.history[req_id][:end]
                token = 10 + (sum(sequence) * 7 + len(sequence)) % 400
                self.history[req_id] = sequence + [token]
                tokens[req_id] = TokenResult(token, -0.5, [])
        self.queue.append(StepResult(tokens, 1000, 10, {}))

    async def receive(self, timeout_s=None):
        await asyncio.sleep(0.001)
        self._check()
        self.receives += 1
        if self.receives == self.lose_at:
            self.gone = True
            if self.first_error_from_survivor:  # rank 0's collective broke before rank 1's stream did
                raise ShardError("shard unix:///s-0: RuntimeError: gloo: Connection reset by peer")
            raise ShardError("shard unix:///s-1: Socket closed", lost=True)
        return self.queue.pop(0)

    async def unreachable(self, timeout_s=2.0):
        return ["unix:///s-1"] if self.gone else []

    def reset_streams(self):
        self.queue.clear()

    async def clear_cache(self, timeout_s=30.0):
        self._check()
        self.queue.clear()
        self.history.clear()

    def come_back(self) -> None:
        self.gone = False
        self.queue.clear()
        self.history.clear()


def _engine(shards: Shards, reconnect=None, num_blocks: int = 32) -> Engine:
    scheduler = Scheduler(SchedulerConfig(8, 64), KVCacheManager(num_blocks, 4))
    return Engine(scheduler, shards, _engine.tokenizer, [2], Metrics(100, 200), reconnect=reconnect)


async def _tokens(engine: Engine, prompt: list[int]) -> list[int] | str:
    spec = GenerationRequest(prompt, SamplingParams(), MAX_NEW_TOKENS, ignore_eos=True)
    try:
        return [e.token.id async for e in engine.generate(spec, Timings(queued_s=0.0))]
    except GenerationError as e:
        return str(e)


async def _run_all(engine: Engine) -> list:
    task = asyncio.create_task(engine.run())
    try:
        return await asyncio.wait_for(asyncio.gather(*(_tokens(engine, p) for p in PROMPTS)), 10)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


@pytest.fixture(autouse=True)
def tokenizer(tiny_tokenizer):
    _engine.tokenizer = tiny_tokenizer


def _undisturbed() -> list[list[int]]:
    return asyncio.run(_run_all(_engine(Shards())))


@pytest.mark.parametrize("first_error_from_survivor", [False, True])
def test_requests_in_flight_resume_token_for_token_in_a_pool_of_the_new_size(first_error_from_survivor):
    expected = _undisturbed()
    shards = Shards(lose_at=5, first_error_from_survivor=first_error_from_survivor)
    states = []

    async def reconnect() -> int:
        states.append(engine.recovering)
        await asyncio.sleep(0.05)
        shards.come_back()
        return 48  # the restarted shards' cache is larger

    engine = _engine(shards, reconnect)
    outputs = asyncio.run(_run_all(engine))
    assert outputs == expected
    assert states == [True] and not engine.recovering and engine.is_healthy
    # recomputed from the prompt plus the tokens its client already has
    assert any(len(ids) > len(p) for ids in shards.recomputed for p in PROMPTS if ids[: len(p)] == p)
    kv = engine.scheduler.kv_cache_manager
    assert (kv.num_blocks, kv.num_free_blocks) == (48, 48)
    m = engine.metrics
    assert (m.shard_restarts._value.get(), m.requests_resumed._value.get()) == (1, 3)
    assert m.batch_max_total_tokens._value.get() == 48 * 4


def test_without_restarts_a_lost_shard_fails_running_and_waiting_requests():
    outputs = asyncio.run(_run_all(_engine(Shards(lose_at=3))))
    assert all(isinstance(o, str) and "Socket closed" in o for o in outputs), outputs


def test_shards_that_do_not_come_back_fail_every_request_and_end_the_loop():
    async def scenario():
        async def reconnect() -> int:
            raise TimeoutError()

        engine = _engine(Shards(lose_at=3), reconnect)
        task = asyncio.create_task(engine.run())
        outputs = await asyncio.wait_for(asyncio.gather(*(_tokens(engine, p) for p in PROMPTS)), 10)
        with pytest.raises(ShardsNotBack):
            await asyncio.wait_for(task, 5)
        return outputs, engine.scheduler.kv_cache_manager

    outputs, kv = asyncio.run(scenario())
    assert all(isinstance(o, str) and "the shards did not come back" in o for o in outputs), outputs
    assert kv.num_free_blocks == kv.num_blocks


def test_a_server_stopping_while_it_waits_for_the_shards_fails_every_request_at_once():
    async def scenario():
        never = asyncio.Event()

        async def reconnect() -> int:
            await never.wait()
            return 32

        engine = _engine(Shards(lose_at=3), reconnect)
        task = asyncio.create_task(engine.run())
        pending = asyncio.gather(*(_tokens(engine, p) for p in PROMPTS))
        while not engine.recovering:
            await asyncio.sleep(0.001)
        engine.stop_resuming()
        outputs = await asyncio.wait_for(pending, 5)
        late = await asyncio.wait_for(_tokens(engine, [5]), 5)  # nothing waits for shards any more
        task.cancel()
        return outputs, late, engine.recovering

    outputs, late, recovering = asyncio.run(scenario())
    assert all(isinstance(o, str) and "the server is stopping" in o for o in outputs), outputs
    assert isinstance(late, str) and not recovering


def test_abort_all_ends_running_and_waiting_requests_with_an_error():
    async def scenario():
        engine = _engine(Shards())
        task = asyncio.create_task(engine.run())
        pending = asyncio.gather(*(_tokens(engine, p) for p in PROMPTS))
        while not engine.scheduler.running:
            await asyncio.sleep(0)
        engine.abort_all("the server is shutting down")
        outputs = await asyncio.wait_for(pending, 5)
        task.cancel()
        return outputs, engine.scheduler

    outputs, scheduler = asyncio.run(scenario())
    assert all(isinstance(o, str) and "shutting down" in o for o in outputs), outputs
    assert not scheduler.has_work and scheduler.kv_cache_manager.num_free_blocks == 32


def test_an_idle_engine_told_of_a_restart_warms_the_new_shards_up_before_serving():
    """With nothing in flight no stream breaks: the launcher's notice (SIGUSR1) makes the engine wait for the
    new group and warm it up, so that the next request does not meet cold shards."""

    async def scenario():
        shards, calls = Shards(), []

        async def reconnect() -> int:
            calls.append("reconnect")
            shards.come_back()
            return 40

        engine = _engine(shards, reconnect)
        task = asyncio.create_task(engine.run())
        first = await asyncio.wait_for(_tokens(engine, PROMPTS[0]), 5)
        engine.shards_restarting()
        while not calls:
            await asyncio.sleep(0.001)
        second = await asyncio.wait_for(_tokens(engine, PROMPTS[0]), 5)
        task.cancel()
        return first, second, calls, engine

    first, second, calls, engine = asyncio.run(scenario())
    assert second == first and calls == ["reconnect"]
    assert engine.scheduler.kv_cache_manager.num_blocks == 40 and engine.metrics.shard_restarts._value.get() == 1
