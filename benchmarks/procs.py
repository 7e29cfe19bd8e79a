"""Process plumbing for the servers a benchmark starts: ports, health, process trees, stopping.

A server is started in its own session (`start_new_session=True`), so that a terminal's Ctrl-C
reaches only the benchmark, which then stops the server, and so that the whole tree can be
signalled as one process group; `stop_tree` also signals every process it saw in the tree by pid,
in case one left the group.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request

import psutil


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def healthy(url: str) -> bool:
    """Whether `GET {url}/health` answers 200."""
    try:
        with urllib.request.urlopen(url + "/health", timeout=2) as resp:
            return resp.status == 200
    except (OSError, urllib.error.URLError):
        return False


def wait_healthy(url: str, proc: subprocess.Popen, timeout_s: float, what: str) -> None:
    """Wait until the server answers `/health`; raise if `proc` exits or `timeout_s` passes first."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode} before it was healthy")
        if healthy(url):
            return
        time.sleep(0.5)
    raise TimeoutError(f"{what} not healthy in {timeout_s:.0f} s")


def tree(pid: int) -> list[psutil.Process]:
    """The process and its descendants (those still there)."""
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def _alive(procs: list[psutil.Process]) -> list[psutil.Process]:
    """Those still running and not zombies (an orphan's zombie may never be reaped in a container)."""
    out = []
    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p)
    return out


def stop_tree(proc: subprocess.Popen, grace_s: float = 30.0, known: list[psutil.Process] = ()) -> None:
    """SIGTERM the process group led by `proc` (and each process of its tree and of `known`), wait up
    to `grace_s` for all of them to exit, then SIGKILL whatever is left; reap `proc`."""
    members = {p.pid: p for p in [*known, *tree(proc.pid)]}
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 10.0)):
        alive = _alive(list(members.values()))
        if not alive and proc.poll() is not None:
            break
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, sig)
        for p in alive:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.send_signal(sig)
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline and (_alive(alive) or proc.poll() is None):
            time.sleep(0.1)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(5)


def stop_survivors(procs: list[psutil.Process], grace_s: float = 10.0) -> None:
    """SIGTERM, then SIGKILL after `grace_s`, whichever of `procs` still run (a parent's stop left them)."""
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
        alive = _alive(procs)
        if not alive:
            return
        for p in alive:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.send_signal(sig)
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline and _alive(alive):
            time.sleep(0.1)


def listener(port: int) -> psutil.Process | None:
    """The process listening on TCP `port` on this machine, if it can be seen."""
    with contextlib.suppress(psutil.AccessDenied):
        for conn in psutil.net_connections(kind="tcp"):
            if conn.status == psutil.CONN_LISTEN and conn.laddr and conn.laddr.port == port and conn.pid:
                with contextlib.suppress(psutil.NoSuchProcess):
                    return psutil.Process(conn.pid)
    return None


def named(procs: list[psutil.Process], prefix: str) -> dict[str, int]:
    """{"prefix:name:pid": pid}, the form `probes.CpuMonitor` takes its server processes in."""
    out = {}
    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            out[f"{prefix}:{p.name()}:{p.pid}"] = p.pid
    return out
