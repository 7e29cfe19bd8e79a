"""Bringing the shards into service: at startup, and again after the launcher restarted a lost group.

A restarted group is reached at the same addresses. Until the launcher has stopped the survivors of
the old group and the new one listens, calls fail as lost (UNAVAILABLE): `until_serving` retries them.
A call that succeeds on every rank reached the new group, since the old one is stopped before any
new rank starts.
"""

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import TypeVar

from router.core.shard_client import ModelInfo, ShardedClient, ShardError, WarmupSpec

log = logging.getLogger(__name__)

T = TypeVar("T")
RETRY_INTERVAL_S = 0.5


async def connect(shards: ShardedClient, timeout_s: float) -> ModelInfo:
    """Wait for every rank to accept connections, read the model's facts, and drop any request
    state the shards hold (a restarted router must not inherit it)."""
    await shards.wait_ready(timeout_s)
    info = await shards.info()
    await shards.clear_cache()
    return info


async def until_serving(shards: ShardedClient, attempt: Callable[[], Awaitable[T]], timeout_s: float) -> T:
    """`attempt()` until it succeeds, retried while shards are lost (the launcher is restarting
    them), for at most `timeout_s` (then TimeoutError). Any other error is raised at once."""
    async with asyncio.timeout(timeout_s):
        while True:
            try:
                return await attempt()
            except ShardError as e:
                if not (e.lost or await shards.unreachable()):
                    raise
                log.info("the shards are not serving yet (%s); trying again", e)
            await asyncio.sleep(RETRY_INTERVAL_S)


async def reconnect(shards: ShardedClient, expected: ModelInfo, warmup: WarmupSpec, timeout_s: float) -> int:
    """After a loss: wait for the restarted shard group, check that it serves the model it served
    before, and warm it up as at startup; returns its number of KV blocks (the pool may change size)."""

    async def attempt() -> int:
        info = await connect(shards, timeout_s)
        if info != expected:
            raise ValueError(f"the restarted shards serve another model: {info}, was {expected}")
        log.info("the shards answer again: warming them up")
        return await shards.warmup(warmup)

    return await until_serving(shards, attempt, timeout_s)
