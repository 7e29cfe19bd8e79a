"""Start the shards and the router, supervise them, and stop them all together."""

import ctypes
import logging
import os
import signal
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass

from launcher.config import LaunchConfig

log = logging.getLogger("launcher")
_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """In the child: receive SIGTERM if the launcher dies, so no process is orphaned."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:
        pass


@dataclass
class Child:
    name: str
    process: subprocess.Popen


class Supervisor:
    def __init__(self, config: LaunchConfig):
        self.config = config
        self.children: list[Child] = []
        self.stopping = False

    def _spawn(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> Child:
        log.info("starting %s", name)
        child = Child(name, subprocess.Popen(argv, env=env, preexec_fn=_die_with_parent))
        self.children.append(child)
        return child

    def _dead_child(self) -> Child | None:
        return next((c for c in self.children if c.process.poll() is not None), None)

    def _wait(self, what: str, ready, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while not ready():
            dead = self._dead_child()
            if dead is not None or self.stopping:
                raise ChildFailed(dead) if dead else KeyboardInterrupt()
            if time.monotonic() > deadline:
                raise TimeoutError(f"{what} not ready after {timeout_s:.0f}s")
            time.sleep(0.1)

    def start(self) -> None:
        cpu_count = os.cpu_count() or 1
        for rank in range(self.config.num_shard):
            self._spawn(f"shard-{rank}", self.config.shard_argv(rank), self.config.shard_env(rank, cpu_count))
        for rank in range(self.config.num_shard):
            path = self.config.shard_address(rank).removeprefix("unix://")
            self._wait(f"shard-{rank}", lambda path=path: os.path.exists(path), timeout_s=600)
        log.info("shards listening; starting the router (warmup sizes the KV cache)")
        self._spawn("router", self.config.router_argv(), self.config.router_env())
        url = f"http://{self.config.local_address}:{self.config.port}/health"
        self._wait("router", lambda: _http_ok(url), timeout_s=600)
        log.info("ready: http://%s:%d", self.config.hostname, self.config.port)

    def supervise(self) -> int:
        """Block until a child dies (returns 1) or a stop was requested (returns 0)."""
        while not self.stopping:
            dead = self._dead_child()
            if dead is not None:
                log.error("%s exited with code %s; stopping everything", dead.name, dead.process.returncode)
                return 1
            time.sleep(0.1)
        return 0

    def shutdown(self) -> None:
        """Router first (it drains in-flight requests), then the shards."""
        routers = [c for c in self.children if c.name == "router"]
        shards = [c for c in self.children if c.name != "router"]
        drain_s = self.config.graceful_termination_timeout_s + 5.0  # the router drains for the timeout itself
        for group, timeout in ((routers, drain_s), (shards, 10.0)):
            for c in group:
                if c.process.poll() is None:
                    c.process.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + timeout
            for c in group:
                try:
                    c.process.wait(max(0.0, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    log.warning("%s did not stop in %.0fs; killing it", c.name, timeout)
                    c.process.kill()
                    c.process.wait()


class ChildFailed(RuntimeError):
    def __init__(self, child: Child):
        super().__init__(f"{child.name} exited with code {child.process.returncode}")
        self.child = child


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.status == 200
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return False
