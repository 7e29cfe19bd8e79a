"""Faults: a stuck shard, a killed router and a restarted router. No request hangs: each one in
flight gets an error (an error event on a stream, 424 or 5xx otherwise) within seconds, or, when the
router itself is gone, sees its connection end.

The stuck-shard test runs first on the module's launcher (with `--step-timeout 3`); the killed-router
test then kills that launcher's router, which ends the launcher. Killed shards: test_tensor_parallel
(without restarts) and test_shard_restart (with them).
"""

import concurrent.futures
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import requests

from tests.e2e.server import EAGER, TEST_PREFILL, LauncherProcess, free_port
from tests.reliability.conftest import SMALL_KV, child_pids, scaled, spawn, stop_process, wait_for, wait_idle

COUNTING = "1, 2, 3, 4, 5, 6, 7, 8,"
GREEDY = {"inputs": "The capital of France is", "parameters": {"max_new_tokens": 12}}


@pytest.fixture(scope="module")
def fault_server(bundled_model_dir):
    launcher = LauncherProcess(bundled_model_dir, "--step-timeout", "3", *SMALL_KV, *EAGER).start()
    yield launcher
    launcher.stop()


def _in_flight(url: str, kind: str, started: concurrent.futures.Future | None = None) -> tuple[str, float]:
    """Run one long request; returns (how it ended, when: time.monotonic())."""
    if kind == "generate":
        body = {"inputs": COUNTING, "parameters": {"max_new_tokens": 400}}
        try:
            r = requests.post(url + "/generate", json=body, timeout=60)
        except requests.RequestException as e:
            return f"exception {type(e).__name__}", time.monotonic()
        return (
            f"status {r.status_code}" + (f" {r.json()['error_type']}" if r.status_code >= 400 else "")
        ), time.monotonic()
    if kind == "chat":
        path = "/v1/chat/completions"
        body = {
            "messages": [{"role": "user", "content": COUNTING}],
            "max_tokens": 400,
            "ignore_eos": True,
            "stream": True,
        }
    else:
        path, body = "/generate_stream", {"inputs": COUNTING, "parameters": {"max_new_tokens": 400}}
    try:
        with requests.post(url + path, json=body, stream=True, timeout=60) as r:
            events = 0
            for line in r.iter_lines(decode_unicode=True):
                if not line.startswith("data:"):
                    continue
                payload = line[5:].strip()
                if payload == "[DONE]":
                    return f"done after {events} events", time.monotonic()
                event = json.loads(payload)
                if "error" in event:
                    return "error event", time.monotonic()
                events += 1
                if events == 2 and started is not None:
                    started.set_result(True)
                if event.get("generated_text") is not None:
                    return "complete", time.monotonic()
            return f"stream closed after {events} events", time.monotonic()
    except requests.RequestException as e:
        return f"exception {type(e).__name__}", time.monotonic()


KINDS = ["stream", "stream", "chat", "generate"]


def _start_requests(pool, url: str) -> list[concurrent.futures.Future]:
    """Start KINDS in flight; return once the streams are generating."""
    started = [concurrent.futures.Future() for _ in KINDS]
    futures = [pool.submit(_in_flight, url, kind, s) for kind, s in zip(KINDS, started)]
    for kind, s in zip(KINDS, started):
        if kind != "generate":
            s.result(timeout=60)
    time.sleep(0.2)
    return futures


def _health(url: str) -> int:
    try:
        return requests.get(url + "/health", timeout=20).status_code
    except requests.RequestException:
        return 0


STOPPED_S = scaled(0, 40)


def test_stuck_shard_fails_requests_then_recovers(fault_server):
    url = fault_server.url
    shard = child_pids(fault_server)["shard-0"]
    reference = requests.post(url + "/generate", json=GREEDY, timeout=60).json()["generated_text"]
    with concurrent.futures.ThreadPoolExecutor(len(KINDS)) as pool:
        futures = _start_requests(pool, url)
        os.kill(shard, signal.SIGSTOP)
        stopped_at = time.monotonic()
        try:
            ends = [f.result(timeout=30) for f in futures]
            health_while_stopped = _health(url)
            # Full mode: stopped past the router's 30 s ClearCache deadline, so its reset fails as well.
            while time.monotonic() - stopped_at < STOPPED_S:
                assert _health(url) == 503
        finally:
            os.kill(shard, signal.SIGCONT)
        resumed_at = time.monotonic()
    waits = [round(t - stopped_at, 1) for _, t in ends]
    print(f"\nstuck shard: {[e for e, _ in ends]} after {waits}s; /health while stopped: {health_while_stopped}")
    for (end, _), kind in zip(ends, KINDS):
        assert end == ("status 424 generation" if kind == "generate" else "error event"), ends
    assert all(w < 12 for w in waits), waits  # --step-timeout 3, plus the step in progress
    assert health_while_stopped == 503

    deadline = time.monotonic() + 30
    while _health(url) != 200:
        assert time.monotonic() < deadline, f"/health not 200 {time.monotonic() - resumed_at:.0f}s after SIGCONT"
        time.sleep(0.5)
    recovered_s = time.monotonic() - resumed_at
    r = requests.post(url + "/generate", json=GREEDY, timeout=60)
    print(f"stuck shard: stopped {resumed_at - stopped_at:.0f}s, /health 200 again {recovered_s:.1f}s after SIGCONT")
    assert r.status_code == 200 and r.json()["generated_text"] == reference
    idle = wait_idle(url)
    assert idle["sluice_kv_blocks_free"] == idle["sluice_kv_blocks_total"]


def test_killed_router_stops_the_launcher_with_a_clear_log(fault_server):
    """The router killed under load: nothing can answer its clients any more, but none of them hangs (each
    sees its connection end), and the launcher exits non-zero within 10 s, naming the router and the signal,
    with no shard left behind. (A killed shard is test_tensor_parallel's and test_shard_restart's.)"""
    url = fault_server.url
    assert requests.get(url + "/health", timeout=20).status_code == 200
    router = child_pids(fault_server)["router"]
    with concurrent.futures.ThreadPoolExecutor(len(KINDS)) as pool:
        futures = _start_requests(pool, url)
        os.kill(router, signal.SIGKILL)
        killed_at = time.monotonic()
        ends = [f.result(timeout=30) for f in futures]
        code = fault_server.process.wait(timeout=10)
    exited_s = time.monotonic() - killed_at
    log = fault_server.log()
    print(f"\nkilled router: {[e for e, _ in ends]}; launcher exited with {code} {exited_s:.1f}s after the kill")
    assert all(e.startswith("exception") or e.startswith("stream closed") for e, _ in ends), ends
    assert code != 0
    assert re.search(r"router \(pid \d+\) was killed by SIGKILL", log), log[-2000:]
    assert not child_pids(fault_server), "a child outlived the launcher"


# ------------------------------------------------------------------------------------------------
# A router restarted against running shards


def _router_ok(url: str) -> bool:
    try:
        return requests.get(url + "/health", timeout=2).status_code == 200
    except requests.RequestException:
        return False


def test_restarted_router_clears_the_shard_and_serves_the_same_output(bundled_model_dir, tmp_path):
    log = tmp_path / "processes.log"
    socket_base = str(tmp_path / "s")
    shard_argv = [sys.executable, "-m", "shard", "--model-id", str(bundled_model_dir), "--uds-path", socket_base]
    shard = spawn([*shard_argv, *SMALL_KV, *EAGER], log)
    routers: list[subprocess.Popen] = []
    try:
        wait_for("the shard", lambda: os.path.exists(socket_base + "-0"), shard, log)
        assert os.stat(socket_base + "-0").st_mode & 0o777 & ~0o600 == 0, oct(os.stat(socket_base + "-0").st_mode)

        def start_router() -> str:
            port = free_port()
            argv = [sys.executable, "-m", "router", "--model-id", str(bundled_model_dir)]
            argv += ["--shard", f"unix://{socket_base}-0", "--port", str(port), "--hostname", "127.0.0.1"]
            argv += TEST_PREFILL
            routers.append(spawn(argv, log))
            url = f"http://127.0.0.1:{port}"
            wait_for("the router", lambda: _router_ok(url), routers[-1], log)
            return url

        url = start_router()
        first = requests.post(url + "/generate", json=GREEDY, timeout=60).json()["generated_text"]
        # Several streams in flight on the shard when the router dies without a word.
        with concurrent.futures.ThreadPoolExecutor(3) as pool:
            futures = _start_requests_n(pool, url, 3)
            routers[-1].kill()
            ends = [f.result(timeout=30) for f in futures]
        assert all(e.startswith("exception") or e.startswith("stream closed") for e, _ in ends), ends
        assert shard.poll() is None, "the shard died with its router"

        url = start_router()  # it calls ClearCache before its warmup: the dead router's requests are gone
        second = requests.post(url + "/generate", json=GREEDY, timeout=60).json()["generated_text"]
        assert second == first
        with concurrent.futures.ThreadPoolExecutor(3) as pool:  # and it serves concurrent streams as before
            ends = [f.result(timeout=120) for f in [pool.submit(_short_stream, url) for _ in range(3)]]
        assert ends == [first] * 3, ends
        m = wait_idle(url)
        assert m["sluice_kv_blocks_free"] == m["sluice_kv_blocks_total"]
        assert m.get('tgi_request_failure{err="generation"}', 0) == 0
        print(f"\nrouter restart: greedy output before {first!r}, after {second!r}")
    finally:
        for router in routers:
            stop_process(router)
        stop_process(shard)


def _start_requests_n(pool, url: str, n: int) -> list[concurrent.futures.Future]:
    started = [concurrent.futures.Future() for _ in range(n)]
    futures = [pool.submit(_in_flight, url, "stream", s) for s in started]
    for s in started:
        s.result(timeout=60)
    return futures


def _short_stream(url: str) -> str:
    with requests.post(url + "/generate_stream", json=GREEDY, stream=True, timeout=60) as r:
        events = [json.loads(line[5:]) for line in r.iter_lines(decode_unicode=True) if line.startswith("data:")]
    return events[-1]["generated_text"]
