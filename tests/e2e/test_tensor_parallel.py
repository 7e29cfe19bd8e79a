"""Three CPU shards over gloo serve what one shard serves; a dying shard fails every request in flight, with
an error its client can read, and takes the launcher down."""

import concurrent.futures
import os
import re
import signal
import threading
import time

import requests

from tests.e2e import clients
from tests.e2e.server import EAGER, LauncherProcess

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village by the sea,"]


def _greedy(url: str) -> list[list[int]]:
    """The greedy tokens for PROMPTS, sent together: one batch, a third of the steps (TP=3 takes ~250 ms
    a step here: three processes share two cores, and each of a step's 60 all-reduces waits for all three)."""

    def one(prompt: str) -> list[int]:
        body = {"inputs": prompt, "parameters": {"max_new_tokens": 16, "details": True}}
        r = requests.post(url + "/generate", json=body, timeout=300)
        return [t["id"] for t in r.json()["details"]["tokens"]]

    with concurrent.futures.ThreadPoolExecutor(len(PROMPTS)) as pool:
        return list(pool.map(one, PROMPTS))


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


IN_FLIGHT = ["generate_stream", "generate_stream", "completions_stream", "chat_stream", "generate", "chat"]


def test_tp3_matches_tp1_and_a_killed_shard_fails_every_request_then_stops_everything(server, bundled_model_dir):
    """TP=3 (eager: three compiles on two cores would take minutes) serves what TP=1 (compiled) serves.
    Then, with streams on TGI and OpenAI routes and non-stream requests in flight, a rank is killed: every
    stream ends with an error event in its route's shape and every waiting request gets its 424 before the
    processes exit; the launcher exits non-zero within 10 s, naming the shard and the signal, and leaves no
    process behind."""
    launcher = LauncherProcess(bundled_model_dir, *EAGER, "--dtype", "float32", num_shard=3).start()
    try:
        assert _greedy(launcher.url) == _greedy(server.url)

        children = _processes_with(launcher.tmp.name)  # every process's argv names the socket directory
        children.pop(launcher.process.pid)
        assert len(children) == 4, children  # three shards and the router
        (shard_1,) = [pid for pid, cmd in children.items() if "-m shard" in cmd and "--rank 1 " in cmd]
        with concurrent.futures.ThreadPoolExecutor(len(IN_FLIGHT)) as pool:
            started = [threading.Event() for _ in IN_FLIGHT]
            futures = [
                pool.submit(clients.run, launcher.url, k, clients.body(k), s) for k, s in zip(IN_FLIGHT, started)
            ]
            for kind, event in zip(IN_FLIGHT, started):
                assert clients.ROUTES[kind][1] is False or event.wait(120), f"{kind} did not start"
            os.kill(shard_1, signal.SIGKILL)
            killed_at = time.monotonic()
            endings = [f.result(timeout=60) for f in futures]
            code = launcher.process.wait(timeout=10)  # raises if the launcher is still up after 10 s
        exited_s = time.monotonic() - killed_at
        log = launcher.log()
        print(f"\nTP=3, shard 1 killed: {[e.how for e in endings]}; launcher exited {exited_s:.1f}s later")
        for kind, ending in zip(IN_FLIGHT, endings):
            if kind == "generate_stream":
                assert ending.how == "error event" and ending.is_tgi_error, (kind, ending)
            elif kind.endswith("_stream"):
                assert ending.how == "error event" and ending.is_openai_error, (kind, ending)
            else:
                assert ending.how == "status 424" and ending.is_tgi_error, (kind, ending)
            assert ending.at < killed_at + exited_s  # reported before the router exited
        assert code != 0
        assert re.search(r"shard-1 \(rank 1, pid \d+\) was killed by SIGKILL", log), log[-3000:]
        deadline = time.monotonic() + 5
        while _processes_with(launcher.tmp.name) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _processes_with(launcher.tmp.name), "orphaned processes left behind"
    finally:
        launcher.stop()
