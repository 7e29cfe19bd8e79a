"""Clients that misbehave: a flood of streams hung up mid-generation, and a client that reads one byte a
second. Neither holds up anyone else nor leaks anything: every KV block is free afterwards, nothing is
left queued or running, and every request is accounted for (the server counts as dropped exactly the
requests whose clients went away before their end).

Reduced (make test): 24 hang-ups, a slow client during two rounds of other requests. Full (make soak):
100 hang-ups, a slow client for a minute of other requests.
"""

import asyncio
import socket
import threading
import time

import aiohttp
import requests

from tests.e2e import clients
from tests.reliability.conftest import scaled, wait_idle

FLOOD = scaled(24, 100)
SLOW_ROUNDS = scaled(2, 12)
DROPPED = 'tgi_request_failure{err="dropped"}'
BYSTANDERS = ["generate", "generate_stream", "chat_stream", "completions"]


def _bystanders(url: str) -> tuple[list[str], float]:
    """Short greedy requests on every route at once: (their texts, seconds for all)."""
    start = time.monotonic()
    endings = [clients.run(url, kind, clients.body(kind, max_new_tokens=24)) for kind in BYSTANDERS]
    assert all(e.how == "complete" for e in endings), endings
    return [e.text for e in endings], time.monotonic() - start


async def _hang_up(session: aiohttp.ClientSession, url: str, i: int) -> int:
    """A long stream whose client leaves after 1 to 3 events; returns the events it read."""
    kind = ["generate_stream", "chat_stream", "completions_stream"][i % 3]
    path, _ = clients.ROUTES[kind]
    events = 0
    async with session.post(url + path, json=clients.body(kind, max_new_tokens=200)) as r:
        assert r.status == 200, await r.text()
        async for line in r.content:
            events += line.startswith(b"data:")
            if events >= 1 + i % 3:
                r.close()  # hang up mid-stream
                break
    return events


def test_a_flood_of_clients_hanging_up_mid_stream_leaks_nothing(rel_server):
    url = rel_server.url
    expected, _ = _bystanders(url)
    before = wait_idle(url)

    async def flood() -> tuple[list[int], list[str]]:
        connector = aiohttp.TCPConnector(limit=FLOOD + 8)
        async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=120)) as session:
            hang_ups = asyncio.gather(*(_hang_up(session, url, i) for i in range(FLOOD)))
            bystanders = asyncio.to_thread(_bystanders, url)
            events, (texts, _) = await asyncio.gather(hang_ups, bystanders)
            return events, texts

    events, texts = asyncio.run(flood())
    after = wait_idle(url, timeout_s=60)
    dropped = after[DROPPED] - before.get(DROPPED, 0)
    print(f"\nflood of {FLOOD} hang-ups: dropped {dropped:g}, KV {after['sluice_kv_blocks_free']:g} free")
    assert all(e >= 1 for e in events)
    assert texts == expected  # the others were served as usual
    assert dropped == FLOOD  # each one that left was aborted, and only those
    assert after["sluice_kv_blocks_free"] == after["sluice_kv_blocks_total"], "KV blocks leaked"
    assert after["tgi_queue_size"] == 0 and after["tgi_batch_current_size"] == 0
    assert requests.get(url + "/health", timeout=10).status_code == 200


class SlowClient(threading.Thread):
    """A stream of fat events (details, top tokens) read one byte a second through a receive buffer of a
    few KiB: once the socket buffers fill, the router's writes to it wait."""

    def __init__(self, url: str, max_new_tokens: int):
        super().__init__(daemon=True)
        host, port = url.removeprefix("http://").split(":")
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        self.sock.connect((host, int(port)))
        body = clients.body("generate_stream", max_new_tokens=max_new_tokens, details=True, top_n_tokens=3)
        payload = requests.Request("POST", url + "/generate_stream", json=body).prepare().body
        head = f"POST /generate_stream HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
        self.sock.sendall(f"{head}Content-Length: {len(payload)}\r\nConnection: close\r\n\r\n".encode() + payload)
        self.received = b""
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.wait(1.0):
            chunk = self.sock.recv(1)
            if not chunk:
                return
            self.received += chunk


def test_a_client_reading_one_byte_a_second_holds_up_no_one(rel_server):
    """While a client reads one byte a second, others are served as usual, and its own request is generated
    to the end without waiting for it (its batch slot and KV blocks are released): it holds up no step. It
    is accounted for once it leaves: a success if the socket took its whole stream, else dropped. (No
    wall-clock comparison: the CI machine is shared, and the others' texts and completion say enough.)"""
    url = rel_server.url
    expected, _ = _bystanders(url)
    before = wait_idle(url)
    slow = SlowClient(url, max_new_tokens=300)
    slow.start()
    try:
        rounds = [_bystanders(url) for _ in range(SLOW_ROUNDS)]
        generated = wait_idle(url, timeout_s=300)  # the slow request too, while its client reads on
        received = slow.received
    finally:
        slow.stop.set()
        slow.join(timeout=5)
        slow.sock.close()
    accounted = 4 * SLOW_ROUNDS + 1  # every request: the others' and the slow one
    deadline = time.monotonic() + 30
    while _ended(after := wait_idle(url), before) < accounted and time.monotonic() < deadline:
        time.sleep(0.1)  # the router notices a closed connection when it writes next
    print(f"\nslow client: read {len(received)} bytes while its 300 tokens were generated; the others took "
          f"{[round(s, 1) for _, s in rounds]}s")  # fmt: skip
    assert 1 <= len(received) < 400 and b"HTTP/1.1 200".startswith(received[:12])
    assert all(texts == expected for texts, _ in rounds)
    assert generated["tgi_batch_current_size"] == 0 and generated["tgi_queue_size"] == 0
    assert generated["sluice_kv_blocks_free"] == generated["sluice_kv_blocks_total"]
    assert _ended(after, before) == accounted
    assert after["sluice_kv_blocks_free"] == after["sluice_kv_blocks_total"], "KV blocks leaked"


def _ended(after: dict[str, float], before: dict[str, float]) -> float:
    """Requests that succeeded or were dropped between the two scrapes."""
    return sum(after.get(k, 0) - before.get(k, 0) for k in ("tgi_request_success", DROPPED))
