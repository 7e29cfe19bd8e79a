"""Every sampling field of an HTTP body reaches the shard: the body goes through the real app,
validation, engine and scheduler; the step is encoded as the router sends it and decoded as the
shard reads it."""

import asyncio
import dataclasses

import pytest
from aiohttp.test_utils import TestClient, TestServer

from router.core.engine import Engine
from router.core.kv_cache_manager import KVCacheManager
from router.core.scheduler import Scheduler, SchedulerConfig
from router.core.shard_client import StepResult, TokenResult, plan_to_pb
from router.http.app import build_app
from router.metrics import Metrics
from router.tokenizer import Tokenizer
from shard.sampler import SamplingParams as ShardSampling
from shard.server import step_from_pb
from tests.router.stand_ins import stand_in_state


class RecordingShards:
    """Answers every step with token 65 ('A'), keeping what a shard would have received."""

    def __init__(self):
        self.received: list = []
        self.results: asyncio.Queue = asyncio.Queue()

    async def send(self, plan, trace_context=None):
        self.received.append(step_from_pb(plan_to_pb(plan)))
        tokens = {s.request.req_id: TokenResult(65, -0.5, []) for s in plan.scheduled if s.produces_token}
        self.results.put_nowait(StepResult(tokens, 1000, 10, {}))

    async def receive(self, timeout_s=None):
        return await self.results.get()

    async def health(self):
        pass


def _fields(p: ShardSampling) -> dict:
    """The parameters, with the logit bias as a flat dict (approx compares no nested structure)."""
    fields = dataclasses.asdict(p)
    logit_bias = fields.pop("logit_bias")
    return {**fields, **{f"logit_bias[{i}]": bias for i, bias in logit_bias}}


def _approx(**fields):
    """The shard's parameters with these fields set: floats as the float32 the proto carries."""
    return pytest.approx(_fields(ShardSampling(**fields)), rel=1e-6)


async def _sampling_received(tokenizer: Tokenizer, path: str, body: dict) -> ShardSampling:
    shards = RecordingShards()
    engine = Engine(Scheduler(SchedulerConfig(8, 64), KVCacheManager(32, 16)), shards, tokenizer, [2], Metrics(8, 16))
    state = dataclasses.replace(stand_in_state(), engine=engine, tokenizer=tokenizer)
    runner = asyncio.create_task(engine.run())
    try:
        async with TestClient(TestServer(build_app(state, 10_000))) as client:
            response = await client.post(path, json=body)
            assert response.status == 200, await response.text()
    finally:
        runner.cancel()
    (new,) = [r for step in shards.received for r in step.new_requests]
    return new.sampling


async def test_tgi_parameters_reach_the_shard(tiny_tokenizer):
    parameters = {
        "do_sample": True,
        "temperature": 0.7,
        "top_k": 5,
        "top_p": 0.9,
        "typical_p": 0.8,
        "repetition_penalty": 1.3,
        "frequency_penalty": 0.4,
        "seed": 42,
        "watermark": True,
        "top_n_tokens": 3,
        "max_new_tokens": 2,
    }
    received = await _sampling_received(tiny_tokenizer, "/generate", {"inputs": "Hello", "parameters": parameters})
    assert _fields(received) == _approx(
        do_sample=True,
        temperature=0.7,
        top_k=5,
        top_p=0.9,
        typical_p=0.8,
        repetition_penalty=1.3,
        frequency_penalty=0.4,
        seed=42,
        watermark=True,
        top_n_tokens=3,
    )


async def test_openai_parameters_reach_the_shard(tiny_tokenizer):
    body = {"prompt": "Hello", "max_tokens": 2, "temperature": 0.5, "top_p": 0.8, "frequency_penalty": -0.5}
    extensions = {"presence_penalty": 1.5, "min_p": 0.05, "logit_bias": {"3": -100, "5": 2.5}}
    received = await _sampling_received(
        tiny_tokenizer, "/v1/completions", {**body, **extensions, "seed": 7, "logprobs": 2}
    )
    expected = dict(do_sample=True, temperature=0.5, top_p=0.8, frequency_penalty=-0.5, seed=7, top_n_tokens=2)
    expected["raw_logprobs"] = True  # OpenAI's logprobs are the model's own; TGI's the processed ones
    expected.update(presence_penalty=1.5, min_p=0.05, logit_bias=((3, -100.0), (5, 2.5)))
    assert _fields(received) == _approx(**expected)
