"""Shard restarts (`--shard-restarts 3`): a killed shard takes its group down, the launcher starts every rank
again, and the router, which kept its listener and its queue, resumes the requests in flight: streams continue
where they were, greedy and seeded outputs are token for token those of an undisturbed run, nothing is lost or
hangs, and every KV block is free at the end. Then, on the same server, a second SIGTERM ends the drain.

Reduced (make test): TP=1, two dozen mixed requests with the three kills aimed at the phases of the fault
matrix: decode (streams running), warmup (the router warming up the restarted group) and prefill (a long
prompt's first step in flight). Full (make soak): TP=3, 500 mixed requests with three kills at random times,
and the three phases each on their own (test_a_shard_killed_during_*).
"""

import asyncio
import concurrent.futures
import datetime
import os
import random
import re
import signal
import threading
import time

import pytest
import requests

from tests.e2e import clients
from tests.e2e.server import EAGER, LauncherProcess
from tests.reliability.conftest import FULL, LIMIT_ARGS, SMALL_KV, child_pids, metrics, scaled, wait_idle
from tests.reliability.loadgen import make_jobs, run_load

NUM_SHARD = scaled(1, 3)
NUM_REQUESTS = scaled(24, 500)
CONCURRENCY = scaled(8, 16)
PER_REQUEST_TIMEOUT_S = 300
SERVER_ARGS = (*LIMIT_ARGS, *SMALL_KV, *EAGER, "--dtype", "float32", "--max-batch-size", "32")
# Long enough that its prefill takes a while, unique so that no cached prefix shortens it.
LONG_PROMPT = " ".join(f"Ledger line {i}: river barge {i * 7 % 13} carried {i * 31 % 97} crates." for i in range(44))


def _server(bundled_model_dir, restarts: int) -> LauncherProcess:
    return LauncherProcess(
        bundled_model_dir, *SERVER_ARGS, "--shard-restarts", str(restarts), num_shard=NUM_SHARD
    ).start()


@pytest.fixture(scope="module")
def restart_server(bundled_model_dir):
    """--shard-restarts 3 for the soak's three kills (reduced: one more, for the idle kill's restart)."""
    launcher = _server(bundled_model_dir, restarts=scaled(4, 3))
    yield launcher
    launcher.stop()


# ------------------------------------------------------------------------------------------------
# Killing a shard, and what the logs and metrics say about it


def full_log(launcher: LauncherProcess) -> str:
    return launcher.log_path.read_text()


def count(launcher: LauncherProcess, text: str) -> int:
    return full_log(launcher).count(text)


WARMING_UP = "the shards answer again: warming them up"
RETRIED = "the shards are not serving yet"
BACK = "the shards are back after"
LOST = "lost the shards"


def wait_for_log(launcher: LauncherProcess, text: str, at_least: int, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while count(launcher, text) < at_least:
        assert launcher.process.poll() is None, full_log(launcher)[-3000:]
        assert time.monotonic() < deadline, f"no {text!r} #{at_least} in the log:\n{full_log(launcher)[-3000:]}"
        time.sleep(0.02)


def wait_serving(url: str, timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    while requests.get(url + "/health", timeout=30).status_code != 200:
        assert time.monotonic() < deadline, "the shards did not come back"
        time.sleep(0.1)


def kill_shard(launcher: LauncherProcess, rank: int = 0) -> None:
    """SIGKILL shard `rank`, waiting for it to exist (the group may be starting)."""
    deadline = time.monotonic() + 120
    while (pid := child_pids(launcher).get(f"shard-{rank}")) is None:
        assert time.monotonic() < deadline, "no shard to kill"
        time.sleep(0.05)
    os.kill(pid, signal.SIGKILL)


def kill_during_decode(launcher: LauncherProcess) -> None:
    """Once requests are running (their prefills done, decoding)."""
    deadline = time.monotonic() + 120
    while metrics(launcher.url)["tgi_batch_current_size"] < 2:
        assert time.monotonic() < deadline, "nothing ran"
        time.sleep(0.05)
    time.sleep(0.3)
    kill_shard(launcher)


def kill_during_warmup(launcher: LauncherProcess) -> None:
    """While the router warms up a restarted group: right after it says so."""
    wait_for_log(launcher, WARMING_UP, count(launcher, WARMING_UP) + 1)
    kill_shard(launcher, rank=NUM_SHARD - 1)


def long_request() -> dict:
    """LONG_PROMPT with its prompt logprobs: computed in full, never from the prefix cache."""
    return clients.body("generate", LONG_PROMPT, 8, decoder_input_details=True)


PREFILL_IN_FLIGHT = r"steps in flight: [^)]*prefill"  # among the steps the router had queued (up to 3)


def kill_during_prefill(launcher: LauncherProcess, expected: str) -> str:
    """Send `long_request()` and kill a shard once the step computing its prompt is on its way; returns the
    router's account of the loss (it names the steps in flight). The request resumes: its text must be
    `expected`."""
    url, done = launcher.url, concurrent.futures.Future()
    before = metrics(url)["sluice_prompt_tokens_computed"]
    losses = count(launcher, LOST)
    thread = threading.Thread(target=lambda: done.set_result(clients.run(url, "generate", long_request())))
    thread.start()
    deadline = time.monotonic() + 120
    while metrics(url)["sluice_prompt_tokens_computed"] < before + 200:
        assert time.monotonic() < deadline and not done.done(), "the long prompt was not scheduled"
        time.sleep(0.01)
    kill_shard(launcher)
    ending = done.result(timeout=PER_REQUEST_TIMEOUT_S)
    assert ending.how == "complete" and ending.text == expected, ending
    return [line for line in full_log(launcher).splitlines() if LOST in line][losses]


# ------------------------------------------------------------------------------------------------
# A shard killed while nothing runs: no stream breaks, the launcher's SIGUSR1 tells the router


@pytest.fixture
def idle_server(request) -> LauncherProcess:
    """The restart server in the reduced run (this test comes first there); the matrix's in the full one."""
    return request.getfixturevalue("matrix_server" if FULL else "restart_server")


def test_a_shard_killed_while_idle_is_warmed_up_before_the_next_request(idle_server):
    url = idle_server.url
    expected = clients.run(url, "generate", clients.body("generate", max_new_tokens=16)).text
    before = wait_idle(url)
    kill_shard(idle_server)
    wait_for_log(idle_server, BACK, count(idle_server, BACK) + 1)
    ending = clients.run(url, "generate", clients.body("generate", max_new_tokens=16))
    after = wait_idle(url)
    assert ending.how == "complete" and ending.text == expected, ending
    assert after["sluice_shard_restarts"] == before["sluice_shard_restarts"] + 1
    assert requests.get(url + "/health", timeout=10).status_code == 200


# ------------------------------------------------------------------------------------------------
# The soak


class Killer(threading.Thread):
    """Kills a shard three times during the load: at the fault matrix's phases (reduced) or at random times
    within `duration_s` (full). Records what it did, or the error that stopped it."""

    def __init__(self, launcher: LauncherProcess, duration_s: float, long_expected: str):
        super().__init__(daemon=True)
        self.launcher, self.duration_s, self.long_expected = launcher, duration_s, long_expected
        self.kills: list[str] = []
        self.error: BaseException | None = None
        self.prefill_loss = ""

    def run(self) -> None:
        try:
            self._phases() if not FULL else self._random()
        except BaseException as e:  # noqa: BLE001 - reported by the test
            self.error = e

    def _phases(self) -> None:
        start, back = time.monotonic(), count(self.launcher, BACK)
        kill_during_decode(self.launcher)
        self.kills.append(f"decode at +{time.monotonic() - start:.1f}s")
        kill_during_warmup(self.launcher)
        self.kills.append(f"warmup at +{time.monotonic() - start:.1f}s")
        wait_for_log(self.launcher, BACK, back + 1)
        self.prefill_loss = kill_during_prefill(self.launcher, self.long_expected)
        self.kills.append(f"prefill at +{time.monotonic() - start:.1f}s")

    def _random(self) -> None:
        rng, start = random.Random(3), time.monotonic()
        times = sorted(rng.uniform(0.1, 0.7) * self.duration_s for _ in range(3))
        for t in times:
            time.sleep(max(0.0, start + t - time.monotonic()))
            wait_serving(self.launcher.url)  # a shard of the group that serves, not a survivor being stopped
            kill_shard(self.launcher, rank=rng.randrange(NUM_SHARD))
            self.kills.append(f"random at +{time.monotonic() - start:.1f}s")


@pytest.mark.timeout(scaled(600, 5400))
def test_shard_kills_during_a_mixed_load_lose_nothing(restart_server):
    launcher, url = restart_server, restart_server.url
    jobs = make_jobs(NUM_REQUESTS, seed=5)
    reference = asyncio.run(run_load(url, jobs, CONCURRENCY, PER_REQUEST_TIMEOUT_S))
    assert not reference.failures(), reference.failures()[:5]
    long_expected = clients.run(url, "generate", long_request()).text
    before = wait_idle(url)

    restarts_before, retries_before = count(launcher, "restarting the shard group"), count(launcher, RETRIED)
    killer = Killer(launcher, reference.seconds, long_expected)
    killer.start()
    report = asyncio.run(run_load(url, jobs, CONCURRENCY, PER_REQUEST_TIMEOUT_S))
    killer.join(timeout=PER_REQUEST_TIMEOUT_S)
    assert killer.error is None, killer.error
    after = wait_idle(url, timeout_s=60)

    expected, got = reference.texts(), report.texts()
    compared = [i for i, job in enumerate(jobs) if job.deterministic]
    differ = [i for i in compared if got.get(i) != expected.get(i)]
    resumed = after["sluice_requests_resumed"] - before["sluice_requests_resumed"]
    summary = (
        f"shard-restart soak ({'full' if FULL else 'reduced'}, {datetime.date.today()}): TP={NUM_SHARD}, "
        f"{NUM_REQUESTS} requests at concurrency {CONCURRENCY}, kills {killer.kills}, outcomes {report.counts()}, "
        f"group restarts {count(launcher, 'restarting the shard group') - restarts_before} (launcher), "
        f"{after['sluice_shard_restarts'] - before['sluice_shard_restarts']:g} back in service (router), "
        f"requests resumed {resumed:g}, "
        f"deterministic outputs equal to the undisturbed run {len(compared) - len(differ)}/{len(compared)}, "
        f"KV blocks free {after['sluice_kv_blocks_free']:g}/{after['sluice_kv_blocks_total']:g}, "
        f"slowest {max(o.seconds for o in report.outcomes):.1f}s, duration {report.seconds:.1f}s "
        f"(undisturbed {reference.seconds:.1f}s)"
    )
    print("\n" + summary)

    assert len(killer.kills) == 3 and count(launcher, "restarting the shard group") - restarts_before == 3
    assert len(report.outcomes) == NUM_REQUESTS and not report.failures(), report.failures()[:10]  # 0 lost, 0 hung
    assert not differ, [(jobs[i].kind, expected.get(i), got.get(i)) for i in differ[:3]]
    generation_failures = 'tgi_request_failure{err="generation"}'
    assert after.get(generation_failures, 0) == before.get(generation_failures, 0)
    assert resumed > 0
    assert after["sluice_kv_blocks_free"] == after["sluice_kv_blocks_total"], "KV blocks leaked"
    assert after["tgi_queue_size"] == 0 and after["tgi_batch_current_size"] == 0
    if not FULL:  # the kills hit their phases: the second one a warmup, the third a prefill
        assert count(launcher, RETRIED) > retries_before, full_log(launcher)[-3000:]
        assert re.search(PREFILL_IN_FLIGHT, killer.prefill_loss), killer.prefill_loss
        assert after["sluice_shard_restarts"] - before["sluice_shard_restarts"] == 2  # kill 2 hit restart 1's warmup


# ------------------------------------------------------------------------------------------------
# SIGTERM twice: the first drains, the second ends the requests in flight with an error at once


def test_a_second_sigterm_ends_the_requests_in_flight_with_an_error(restart_server):
    launcher = restart_server
    kinds = ["generate_stream", "generate_stream", "chat_stream", "generate"]
    with concurrent.futures.ThreadPoolExecutor(len(kinds)) as pool:
        started = [threading.Event() for _ in kinds]
        futures = [pool.submit(clients.run, launcher.url, k, clients.body(k, max_new_tokens=800), s)
                   for k, s in zip(kinds, started)]  # fmt: skip
        for kind, event in zip(kinds, started):
            assert not clients.ROUTES[kind][1] or event.wait(120), f"{kind} did not start"
        launcher.process.send_signal(signal.SIGTERM)
        time.sleep(1.0)
        draining = [not f.done() for f in futures]
        launcher.process.send_signal(signal.SIGTERM)
        second_at = time.monotonic()
        endings = [f.result(timeout=60) for f in futures]
        code = launcher.process.wait(timeout=15)
    exited_s = time.monotonic() - second_at
    print(f"\nSIGTERM twice: {[e.how for e in endings]}, launcher exited {exited_s:.1f}s after the second")
    assert all(draining), "the first SIGTERM cut requests instead of draining"
    for kind, ending in zip(kinds, endings):
        if kind == "generate":
            assert ending.how == "status 424" and ending.is_tgi_error, ending
        else:
            assert ending.how == "error event" and "shutting down" in str(ending.error), ending
    assert code == 0 and exited_s < 10
    assert re.search(r"received SIGTERM again", full_log(launcher))
    assert not child_pids(launcher), "a child outlived the launcher"


# ------------------------------------------------------------------------------------------------
# Full: each phase of the fault matrix on its own, on a server of its own


@pytest.fixture(scope="module")
def matrix_server(bundled_model_dir):
    if not FULL:
        pytest.skip("make soak: the reduced soak kills at each phase")
    launcher = _server(bundled_model_dir, restarts=9)
    yield launcher
    launcher.stop()


IN_FLIGHT = ["generate_stream", "completions_stream", "chat_stream", "generate", "chat"]


def _resume_case(launcher: LauncherProcess, kill) -> None:
    """Requests in flight on every route when `kill` strikes all complete as an undisturbed run's; /health
    says 503 during the restart and 200 after; every KV block is free at the end."""
    url = launcher.url
    bodies = [clients.body(k, max_new_tokens=60) for k in IN_FLIGHT]
    expected = [clients.run(url, k, b).text for k, b in zip(IN_FLIGHT, bodies)]
    before = wait_idle(url)
    with concurrent.futures.ThreadPoolExecutor(len(IN_FLIGHT)) as pool:
        started = [threading.Event() for _ in IN_FLIGHT]
        futures = [pool.submit(clients.run, url, k, b, s) for k, b, s in zip(IN_FLIGHT, bodies, started)]
        kill()
        health = set()
        while not all(f.done() for f in futures):
            try:
                health.add(requests.get(url + "/health", timeout=5).status_code)
            except requests.RequestException as e:
                health.add(type(e).__name__)
            time.sleep(0.2)
        endings = [f.result() for f in futures]
    after = wait_idle(url, timeout_s=60)
    print(f"\n{[e.how for e in endings]}; /health during the restart: {sorted(map(str, health))}")
    assert [e.how for e in endings] == ["complete"] * len(IN_FLIGHT), endings
    assert [e.text for e in endings] == expected
    assert 503 in health and requests.get(url + "/health", timeout=10).status_code == 200
    assert after["sluice_shard_restarts"] > before["sluice_shard_restarts"]
    assert after["sluice_requests_resumed"] > before["sluice_requests_resumed"]
    assert after["sluice_kv_blocks_free"] == after["sluice_kv_blocks_total"]


def test_a_shard_killed_during_decode_resumes_its_requests(matrix_server):
    _resume_case(matrix_server, lambda: kill_during_decode(matrix_server))


def test_a_shard_killed_during_warmup_resumes_its_requests(matrix_server):
    def kill_twice():
        kill_during_decode(matrix_server)
        kill_during_warmup(matrix_server)

    retries = count(matrix_server, RETRIED)
    _resume_case(matrix_server, kill_twice)
    assert count(matrix_server, RETRIED) > retries


def test_a_shard_killed_during_prefill_resumes_its_requests(matrix_server):
    expected = clients.run(matrix_server.url, "generate", long_request()).text
    wait_idle(matrix_server.url)
    loss = kill_during_prefill(matrix_server, expected)
    assert re.search(PREFILL_IN_FLIGHT, loss), loss
    m = wait_idle(matrix_server.url, timeout_s=60)
    assert m["sluice_kv_blocks_free"] == m["sluice_kv_blocks_total"]
