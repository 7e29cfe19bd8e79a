"""Three CPU shards over gloo serve what one shard serves; a dying shard takes the launcher down."""

import os
import signal
import time

import requests

from tests.e2e.server import LauncherProcess

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village by the sea,"]


def _greedy(url: str, prompt: str) -> list[int]:
    r = requests.post(
        url + "/generate", json={"inputs": prompt, "parameters": {"max_new_tokens": 16, "details": True}}, timeout=300
    )
    return [t["id"] for t in r.json()["details"]["tokens"]]


def _processes_with(fragment: str) -> dict[int, str]:
    found = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = open(f"/proc/{pid}/cmdline", "rb").read().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if fragment in cmdline:
            found[int(pid)] = cmdline
    return found


def test_tp3_matches_tp1_and_a_killed_shard_stops_everything(server, bundled_model_dir):
    launcher = LauncherProcess(bundled_model_dir, "--dtype", "float32", num_shard=3).start()
    try:
        assert [_greedy(launcher.url, p) for p in PROMPTS] == [_greedy(server.url, p) for p in PROMPTS]

        children = _processes_with(launcher.tmp.name)  # every process's argv names the socket directory
        children.pop(launcher.process.pid)
        assert len(children) == 4, children  # three shards and the router
        (shard_1,) = [pid for pid, cmd in children.items() if "-m shard" in cmd and "--rank 1 " in cmd]
        os.kill(shard_1, signal.SIGKILL)
        code = launcher.process.wait(timeout=10)  # raises if the launcher is still up after 10 s
        assert code != 0
        assert "shard-1 exited with code -9" in launcher.log()
        deadline = time.monotonic() + 5
        while _processes_with(launcher.tmp.name) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _processes_with(launcher.tmp.name), "orphaned processes left behind"
    finally:
        launcher.stop()
