"""SIGTERM drains: streams in flight finish, new connections are refused, the launcher exits 0."""

import concurrent.futures
import json
import signal
import threading
import time

import requests

from tests.e2e.server import EAGER, LauncherProcess


def _stream(url: str, started: threading.Barrier) -> dict:
    # A counting prompt runs to the length limit (raw instructions get an immediate EOS from this model).
    body = {"inputs": "1, 2, 3, 4, 5, 6, 7, 8,", "parameters": {"max_new_tokens": 150, "details": True}}
    with requests.post(url + "/generate_stream", json=body, stream=True, timeout=120) as r:
        events = []
        for line in r.iter_lines(decode_unicode=True):
            if line.startswith("data:"):
                events.append(json.loads(line[5:]))
                if len(events) == 1:
                    started.wait()
        return events[-1]


def test_sigterm_lets_active_streams_finish_and_refuses_new_requests(bundled_model_dir):
    launcher = LauncherProcess(bundled_model_dir, "--graceful-termination-timeout", "60", *EAGER).start()
    try:
        started = threading.Barrier(9)
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            streams = [pool.submit(_stream, launcher.url, started) for _ in range(8)]
            started.wait(timeout=60)  # every stream has its first token
            launcher.process.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + 10
            refused = False
            while not refused and time.monotonic() < deadline:
                try:
                    requests.get(launcher.url + "/health", timeout=1)
                    time.sleep(0.1)
                except requests.ConnectionError:
                    refused = True
            assert refused, "the router kept accepting connections after SIGTERM"
            assert not all(s.done() for s in streams), "streams ended before the drain was observed"
            finals = [s.result(timeout=90) for s in streams]
        assert [f["details"]["finish_reason"] for f in finals] == ["length"] * 8
        assert launcher.process.wait(timeout=60) == 0
    finally:
        launcher.stop()
