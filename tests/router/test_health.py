"""/health (readiness) and /live (liveness) while the shards serve, fail, or are being restarted."""

import dataclasses
import types

import pytest
from aiohttp.test_utils import TestClient, TestServer

from router.http.app import build_app
from tests.router.stand_ins import stand_in_state


@pytest.mark.parametrize(
    ("shards_healthy", "recovering", "health", "live"),
    [
        (True, False, 200, 200),
        (False, False, 503, 503),  # a shard does not answer: neither ready nor alive
        (False, True, 503, 200),  # the launcher restarts the shards: not ready, but alive
    ],
)
async def test_health_and_live(shards_healthy, recovering, health, live):
    state = stand_in_state(is_healthy=shards_healthy)
    state = dataclasses.replace(state, engine=types.SimpleNamespace(is_healthy=True, recovering=recovering))
    async with TestClient(TestServer(build_app(state, 1000))) as client:
        assert (await client.get("/health")).status == health
        assert (await client.get("/live")).status == live
        if recovering:
            assert (await (await client.get("/health")).json())["error"] == "the shards are restarting"
