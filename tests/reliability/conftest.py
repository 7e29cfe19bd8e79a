"""Shared pieces of the reliability suite: the mode (reduced in `make test`, full with
SLUICE_SOAK=full as `make soak` sets), a launcher with small limits, and readers for the
server's metrics and its processes."""

import os
import subprocess
import time
from pathlib import Path

import pytest
import requests

from tests.e2e.server import EAGER, LauncherProcess

FULL = os.environ.get("SLUICE_SOAK", "").lower() == "full"


def scaled(reduced: int, full: int) -> int:
    """`reduced` in the default run, `full` under SLUICE_SOAK=full."""
    return full if FULL else reduced


# Small enough that nothing generates for long, large enough for the soak's long requests; the
# non-default validation limits prove the launcher passes them through.
LIMIT_ARGS = (
    "--max-total-tokens",
    "1024",
    "--max-input-tokens",
    "896",
    "--max-stop-sequences",
    "2",
    "--max-top-n-tokens",
    "3",
    "--max-best-of",
    "3",
)
SMALL_KV = ("--cpu-kv-cache-gb", "0.5")  # ~700 blocks of 16 tokens for SmolLM2-135M


def metrics(url: str) -> dict[str, float]:
    """Every sample of GET /metrics, by its name with labels."""
    out = {}
    for line in requests.get(url + "/metrics", timeout=15).text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def wait_idle(url: str, timeout_s: float = 10.0) -> dict[str, float]:
    """Metrics once every KV block is free and nothing waits or runs (or the last ones at the deadline)."""
    deadline = time.monotonic() + timeout_s
    while True:
        m = metrics(url)
        idle = (
            m["sluice_kv_blocks_free"] == m["sluice_kv_blocks_total"]
            and m["tgi_queue_size"] == 0
            and m["tgi_batch_current_size"] == 0
        )
        if idle or time.monotonic() > deadline:
            return m
        time.sleep(0.1)


def child_pids(launcher: LauncherProcess) -> dict[str, int]:
    """{"router": pid, "shard-0": pid, ...}: the launcher's children, found by their argv."""
    out = {}
    marker = launcher.tmp.name.encode()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if int(pid) == launcher.process.pid or not any(marker in a for a in argv):
            continue
        if b"router" in argv:
            out["router"] = int(pid)
        elif b"shard" in argv:
            rank = argv[argv.index(b"--rank") + 1].decode() if b"--rank" in argv else "0"
            out[f"shard-{rank}"] = int(pid)
    return out


def rss_mib(pid: int) -> float:
    """Resident memory of a process (VmRSS) in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise KeyError("VmRSS")


def spawn(argv: list[str], log: Path) -> subprocess.Popen:
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="2")
    return subprocess.Popen(argv, stdout=log.open("a"), stderr=subprocess.STDOUT, env=env)


def wait_for(what: str, ready, process: subprocess.Popen, log: Path, timeout_s: float = 180) -> None:
    deadline = time.monotonic() + timeout_s
    while not ready():
        if process.poll() is not None:
            raise RuntimeError(f"{what} exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not ready after {timeout_s}s:\n{log.read_text()[-3000:]}")
        time.sleep(0.2)


def stop_process(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture(scope="session")
def rel_server(bundled_model_dir):
    """One launcher for the hostile-input, soak and security tests."""
    with LauncherProcess(bundled_model_dir, *LIMIT_ARGS, *SMALL_KV, *EAGER) as launcher:
        yield launcher
