"""Getting the shards back: calls are retried while a shard is unreachable (the launcher is restarting the
group), a group that answers with an error or serves another model is given up on at once, and the wait is
bounded."""

import asyncio

import pytest

from router.core import shard_setup
from router.core.shard_client import ModelInfo, ShardError, WarmupSpec

INFO = ModelInfo("LlamaForCausalLM", "float32", "cpu", 256, [2], 16, 2048, 3, None, 1000)
SPEC = WarmupSpec(64, 4, 0)


class Restarting:
    """Shards unreachable for the first `down` calls; then they answer Info with `info` and Warmup with
    `num_blocks` blocks, or `error` (which they answer with, all of them reachable)."""

    def __init__(self, down: int, info: ModelInfo = INFO, error: ShardError | None = None):
        self.down, self.model, self.error = down, info, error
        self.calls: list[str] = []

    def _call(self, name: str) -> None:
        self.calls.append(name)
        if len(self.calls) <= self.down:
            raise ShardError("shard unix:///s-1: failed to connect", lost=True)

    async def wait_ready(self, timeout_s):
        await asyncio.sleep(0)

    async def info(self):
        self._call("info")
        return self.model

    async def clear_cache(self, timeout_s=30.0):
        self._call("clear_cache")

    async def warmup(self, spec):
        self._call("warmup")
        if self.error:
            raise self.error
        return 77

    async def unreachable(self, timeout_s=2.0):
        return []


@pytest.fixture(autouse=True)
def fast_retries(monkeypatch):
    monkeypatch.setattr(shard_setup, "RETRY_INTERVAL_S", 0.001)


def test_calls_are_retried_until_the_restarted_group_serves():
    shards = Restarting(down=4)
    assert asyncio.run(shard_setup.reconnect(shards, INFO, SPEC, timeout_s=5)) == 77
    assert shards.calls[-3:] == ["info", "clear_cache", "warmup"]


def test_shards_answering_with_an_error_are_not_waited_for():
    shards = Restarting(down=0, error=ShardError("INTERNAL: not enough memory for the KV cache"))
    with pytest.raises(ShardError, match="not enough memory"):
        asyncio.run(shard_setup.reconnect(shards, INFO, SPEC, timeout_s=5))
    assert shards.calls.count("warmup") == 1


def test_a_group_serving_another_model_is_refused():
    other = ModelInfo("Qwen2ForCausalLM", "float32", "cpu", 256, [2], 16, 2048, 3, None, 1000)
    with pytest.raises(ValueError, match="another model"):
        asyncio.run(shard_setup.reconnect(Restarting(down=0, info=other), INFO, SPEC, timeout_s=5))


def test_the_wait_is_bounded():
    with pytest.raises(TimeoutError):
        asyncio.run(shard_setup.reconnect(Restarting(down=1 << 30), INFO, SPEC, timeout_s=0.2))
