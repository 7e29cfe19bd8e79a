"""Overload and the API key, on a launcher with `--max-concurrent-requests 4` and `--api-key`.

A burst of 40 concurrent streams: the excess are refused with 429 at once (each in under a second),
the admitted ones complete, /health answers 200 throughout, and the router's memory stays bounded.
"""

import asyncio
import json
import time

import aiohttp
import pytest
import requests

from tests.e2e.server import EAGER, LauncherProcess
from tests.reliability.conftest import SMALL_KV, child_pids, rss_mib, scaled, wait_idle

KEY = "k3y-0f-the-reliability-suite"
AUTH = {"Authorization": f"Bearer {KEY}"}
LIMIT = 4
BURST = 40
WAVES = scaled(1, 8)
RSS_GROWTH_MIB = 50


@pytest.fixture(scope="module")
def small_server(bundled_model_dir):
    args = ("--max-concurrent-requests", str(LIMIT), *SMALL_KV)
    with LauncherProcess(bundled_model_dir, *args, *EAGER, env={"API_KEY": KEY}) as launcher:
        yield launcher


def _stream_body(i: int) -> tuple[str, dict]:
    if i % 2:
        return "/v1/chat/completions", {
            "messages": [{"role": "user", "content": "1, 2, 3, 4, 5, 6, 7, 8,"}],
            "max_tokens": 48,
            "ignore_eos": True,
            "stream": True,
        }
    return "/generate_stream", {"inputs": "1, 2, 3, 4, 5, 6, 7, 8,", "parameters": {"max_new_tokens": 48}}


async def _one(session: aiohttp.ClientSession, url: str, i: int, go: asyncio.Event) -> tuple[int, float, int]:
    """(status, seconds to the status line, events read)"""
    path, body = _stream_body(i)
    await go.wait()
    start = time.monotonic()
    async with session.post(url + path, json=body, headers=AUTH) as r:
        elapsed = time.monotonic() - start
        if r.status != 200:
            error = await r.json()
            assert set(error) == {"error", "error_type"}, error
            return r.status, elapsed, 0
        events = 0
        async for line in r.content:
            if line.startswith(b"data:"):
                payload = line[5:].strip()
                assert b'"error"' not in payload, payload
                events += 1
                if payload == b"[DONE]" or json.loads(payload).get("generated_text") is not None:
                    return 200, elapsed, events
        raise AssertionError(f"stream {i} ended without its last event after {events} events")


async def _burst(url: str) -> tuple[list[tuple[int, float, int]], list[int]]:
    go, health = asyncio.Event(), []
    stop = asyncio.Event()
    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=BURST + 2)) as session:

        async def poll_health():
            await go.wait()
            while not stop.is_set():
                async with session.get(url + "/health", timeout=aiohttp.ClientTimeout(total=5)) as r:
                    health.append(r.status)
                await asyncio.sleep(0.2)

        poller = asyncio.create_task(poll_health())
        tasks = [asyncio.create_task(_one(session, url, i, go)) for i in range(BURST)]
        await asyncio.sleep(0.2)  # every task waits on `go`
        go.set()
        results = await asyncio.gather(*tasks)
        stop.set()
        await poller
    return results, health


def test_burst_over_the_limit_is_refused_at_once(small_server):
    router = child_pids(small_server)["router"]
    wait_idle(small_server.url)
    rss = [rss_mib(router)]
    for wave in range(WAVES):
        results, health = asyncio.run(_burst(small_server.url))
        rss.append(rss_mib(router))
        admitted = [r for r in results if r[0] == 200]
        refused = [r for r in results if r[0] == 429]
        print(
            f"\noverload wave {wave}: {len(admitted)} admitted, {len(refused)} refused "
            f"(slowest 429 {max(r[1] for r in refused):.3f}s), health {sorted(set(health))} x{len(health)}, "
            f"router RSS {rss[-1]:.0f} MiB"
        )
        assert len(admitted) + len(refused) == BURST, [r[0] for r in results]
        assert 1 <= len(admitted) <= LIMIT
        assert all(r[1] < 1.0 for r in refused), sorted(r[1] for r in refused)[-3:]
        assert all(r[2] > 1 for r in admitted)  # admitted streams ran to their end
        assert health and set(health) == {200}
    after = wait_idle(small_server.url)
    assert after["sluice_kv_blocks_free"] == after["sluice_kv_blocks_total"]
    assert after['tgi_request_failure{err="overloaded"}'] >= BURST - LIMIT
    assert max(rss) - rss[0] < RSS_GROWTH_MIB, rss


ROUTE_BODIES = {
    "/": {"inputs": "Hi", "parameters": {"max_new_tokens": 1}},
    "/generate": {"inputs": "Hi", "parameters": {"max_new_tokens": 1}},
    "/generate_stream": {"inputs": "Hi", "parameters": {"max_new_tokens": 1}},
    "/tokenize": {"inputs": "Hi"},
    "/v1/chat/completions": {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1},
    "/v1/completions": {"prompt": "Hi", "max_tokens": 1},
}


@pytest.mark.parametrize("route", sorted(ROUTE_BODIES))
def test_api_key_guards_every_generation_route(small_server, route):
    url = small_server.url + route
    body = ROUTE_BODIES[route]
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}, {"Authorization": f"bearer {KEY}"}):
        r = requests.post(url, json=body, headers=headers, timeout=30)
        assert r.status_code == 401 and r.json() == {"error": "Unauthorized", "error_type": "authentication"}
    # Refused before the body is read: no parsing, validation or tokenization for strangers.
    start = time.monotonic()
    r = requests.post(url, data=b"{" * 1_900_000, headers={"Content-Type": "application/json"}, timeout=30)
    assert r.status_code == 401 and time.monotonic() - start < 1.0
    r = requests.post(url, json=body, headers=AUTH, timeout=60)
    assert r.status_code == 200, r.text


def test_api_key_leaves_info_routes_open(small_server):
    for path in ("/health", "/info", "/metrics", "/v1/models", "/openapi.json"):
        assert requests.get(small_server.url + path, timeout=15).status_code == 200, path
