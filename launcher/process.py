"""Start the shards and the router, supervise them, and stop them all together.

A shard that dies breaks its tensor-parallel group, whose other ranks cannot take a member back:
the launcher stops them all. Then, within the restart budget (--shard-restarts within
--shard-restart-window), it starts every rank again while the router keeps its listener and its
queue, waits for the new group and resumes the requests it held; beyond the budget it stops the
router, which has reported the failure to every client, and exits non-zero. A router that dies
ends everything.

Between launcher and router: the router learns of a loss from its shard streams (they break at
once) and, started with --await-shard-restart, waits for the shards to listen again; before a
restart the launcher also sends it SIGUSR1, so that an idle router, with no stream to see break,
warms the new group up too. SIGTERM stops it: draining, or, once its shards are gone, failing what
it holds at once; a second SIGTERM ends every request in flight with an error.
"""

import ctypes
import logging
import os
import signal
import subprocess
import time
import urllib.error
import urllib.request
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from launcher.config import LaunchConfig

log = logging.getLogger("launcher")
_PR_SET_PDEATHSIG = 1

STARTUP_TIMEOUT_S = 600.0  # for the shards to listen, and then for the router to serve
SHARDS_STOP_S = 10.0  # the shards' share of a requested stop
SHARDS_STOP_AFTER_FAILURE_S = 3.0  # survivors of a broken group may be stuck in a collective: not worth more
ROUTER_STOP_AFTER_FAILURE_S = 2.0  # then a second SIGTERM: the router ends whatever it still holds
ROUTER_ABORT_S = 3.0  # how long the router gets to write those errors before it is killed


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
    rank: int | None = None  # a shard's tensor-parallel rank; None for the router

    def describe_exit(self) -> str:
        """How the child ended, e.g. "shard-1 (rank 1, pid 4242) was killed by SIGKILL"."""
        pid = self.process.pid
        who = f"{self.name} (pid {pid})" if self.rank is None else f"{self.name} (rank {self.rank}, pid {pid})"
        code = self.process.returncode
        if code is not None and code < 0:
            try:
                return f"{who} was killed by {signal.Signals(-code).name}"
            except ValueError:
                return f"{who} was killed by signal {-code}"
        return f"{who} exited with code {code}"


class ChildFailed(RuntimeError):
    """A child exited and is not restarted."""

    def __init__(self, child: Child):
        super().__init__(child.describe_exit())
        self.child = child


class StopRequested(Exception):
    """SIGTERM or SIGINT arrived while the launcher waited for a child."""


class RestartBudget:
    """At most `limit` restarts within any `window_s` seconds."""

    def __init__(self, limit: int, window_s: float):
        self.limit = limit
        self.window_s = window_s
        self._times: deque[float] = deque()

    def take(self, now: float) -> bool:
        """Count a restart at `now` if the budget allows one; False if it does not."""
        while self._times and now - self._times[0] > self.window_s:
            self._times.popleft()
        if len(self._times) >= self.limit:
            return False
        self._times.append(now)
        return True

    @property
    def used(self) -> int:
        """Restarts counted within the window, as of the last `take`."""
        return len(self._times)


class Supervisor:
    def __init__(self, config: LaunchConfig):
        self.config = config
        self.children: list[Child] = []
        self.stopping = False  # a stop was requested: no more restarts
        self.hurried = False  # a second stop signal: the router ends its requests now instead of draining
        self.serving = False  # the router has served: it handles SIGUSR1 (during its first warmup it may not yet)
        self.restarts = RestartBudget(config.shard_restarts, config.shard_restart_window_s)

    # -- children ---------------------------------------------------------------------------------
    def _spawn(self, name: str, argv: list[str], env: dict[str, str] | None = None, rank: int | None = None) -> None:
        log.info("starting %s", name)
        self.children.append(Child(name, subprocess.Popen(argv, env=env, preexec_fn=_die_with_parent), rank))

    @property
    def shards(self) -> list[Child]:
        return [c for c in self.children if c.rank is not None]

    @property
    def router(self) -> Child | None:
        return next((c for c in self.children if c.rank is None), None)

    def _dead_child(self) -> Child | None:
        return next((c for c in self.children if c.process.poll() is not None), None)

    def _spawn_shards(self) -> None:
        cpu_count = os.cpu_count() or 1
        for rank in range(self.config.num_shard):
            path = self.config.shard_address(rank).removeprefix("unix://")
            try:  # a stale socket would pass for the new shard's
                os.unlink(path)
            except FileNotFoundError:
                pass
            env = self.config.shard_env(rank, cpu_count)
            self._spawn(f"shard-{rank}", self.config.shard_argv(rank), env, rank=rank)

    def _wait_for_shards(self, restartable: bool) -> None:
        for rank in range(self.config.num_shard):
            path = self.config.shard_address(rank).removeprefix("unix://")
            self._wait(f"shard-{rank}", lambda path=path: os.path.exists(path), STARTUP_TIMEOUT_S, restartable)

    def _wait(self, what: str, ready: Callable[[], bool], timeout_s: float, restartable: bool = True) -> None:
        """Poll `ready` until it holds. A child that dies meanwhile is handled by `_on_exit` (the
        shard group restarts, or ChildFailed) when `restartable`, else raises ChildFailed."""
        deadline = time.monotonic() + timeout_s
        while not ready():
            if self.stopping:
                raise StopRequested()
            dead = self._dead_child()
            if dead is not None:
                if not restartable:
                    raise ChildFailed(dead)
                self._on_exit(dead)
                continue
            if time.monotonic() > deadline:
                raise TimeoutError(f"{what} not ready after {timeout_s:.0f}s")
            time.sleep(0.1)

    # -- running ----------------------------------------------------------------------------------
    def start(self) -> None:
        """Start the shards, then the router (which warms them up); return once it serves."""
        self._spawn_shards()
        self._wait_for_shards(restartable=True)
        log.info("shards listening; starting the router (warmup sizes the KV cache)")
        self._spawn("router", self.config.router_argv(), self.config.router_env())
        url = f"http://{self.config.local_address}:{self.config.port}/health"
        self._wait("router", lambda: _http_ok(url), STARTUP_TIMEOUT_S)
        self.serving = True
        log.info("ready: http://%s:%d", self.config.hostname, self.config.port)

    def supervise(self) -> int:
        """Block until a stop is requested (returns 0) or a child fails for good (returns 1): the
        router, or a shard beyond the restart budget."""
        try:
            while not self.stopping:
                dead = self._dead_child()
                if dead is not None:
                    self._on_exit(dead)
                time.sleep(0.1)
        except ChildFailed:
            log.error("stopping everything")
            return 1
        except StopRequested:
            pass
        return 0

    def _on_exit(self, dead: Child) -> None:
        """`dead` exited: restart the shard group if it was a shard and the budget allows (again if
        a new rank dies while starting); raise ChildFailed otherwise."""
        while True:
            log.error("%s", dead.describe_exit())
            if dead.rank is None or self.stopping or not self._may_restart():
                raise ChildFailed(dead)
            try:
                self._restart_shards()
                return
            except ChildFailed as e:
                dead = e.child

    def _may_restart(self) -> bool:
        c = self.config
        if not c.shard_restarts:
            return False
        if not self.restarts.take(time.monotonic()):
            log.error(
                "not restarting the shards: %d restart(s) within the last %gs already (--shard-restarts %d)",
                self.restarts.used,
                c.shard_restart_window_s,
                c.shard_restarts,
            )
            return False
        return True

    def _restart_shards(self) -> None:
        """Stop every rank still running, start them all again and wait until they listen; the
        router reconnects by itself (and warms them up)."""
        log.warning(
            "restarting the shard group: restart %d of %d allowed within %gs",
            self.restarts.used,
            self.config.shard_restarts,
            self.config.shard_restart_window_s,
        )
        router = self.router
        if self.serving and router is not None and router.process.poll() is None:
            router.process.send_signal(signal.SIGUSR1)  # it waits for the new group, even when idle
        _stop(self.shards, SHARDS_STOP_AFTER_FAILURE_S)
        self.children = [c for c in self.children if c.rank is None]
        self._spawn_shards()
        self._wait_for_shards(restartable=False)
        log.info("the shard group listens again; the router warms it up and resumes its requests")

    # -- stopping ---------------------------------------------------------------------------------
    def shutdown(self, failed: bool = False) -> None:
        """Stop every child. After a requested stop, the router first: it drains the requests in
        flight (a second stop signal makes it end them now), then the shards. After a failure, the
        shards first (the router has seen them go and failed their requests; nothing it calls can
        hang then), then the router, within seconds."""
        router = [self.router] if self.router else []
        if failed:
            _stop(self.shards, SHARDS_STOP_AFTER_FAILURE_S)
            self._stop_router(router, ROUTER_STOP_AFTER_FAILURE_S + ROUTER_ABORT_S)
        else:
            self._stop_router(router, self.config.graceful_termination_timeout_s + 5.0)  # it drains for the timeout
            _stop(self.shards, SHARDS_STOP_S)

    def _stop_router(self, router: list[Child], timeout_s: float) -> None:
        """SIGTERM (drain); a second SIGTERM (end every request with an error) once hurried or
        ROUTER_ABORT_S before `timeout_s`; SIGKILL at `timeout_s`."""
        if not router or router[0].process.poll() is not None:
            return
        process = router[0].process
        process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        hurried = False
        while process.poll() is None:
            now = time.monotonic()
            if not hurried and (self.hurried or now > deadline - ROUTER_ABORT_S):
                process.send_signal(signal.SIGTERM)
                hurried, deadline = True, min(deadline, now + ROUTER_ABORT_S)
            if now > deadline:
                log.warning("the router did not stop in time; killing it")
                process.kill()
                break
            time.sleep(0.05)
        process.wait()


def _stop(children: list[Child], timeout_s: float) -> None:
    """SIGTERM every child still running, then SIGKILL those left after `timeout_s`."""
    for c in children:
        if c.process.poll() is None:
            c.process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    for c in children:
        try:
            c.process.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            log.warning("%s did not stop in %.0fs; killing it", c.name, timeout_s)
            c.process.kill()
            c.process.wait()


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.status == 200
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return False
