"""Start the launcher on free ports for a test, and always stop it."""

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# For servers that test the router, the launcher or faults rather than the model: an eager forward
# starts in half the time of a compiled one (the session's `server` keeps the compiled default).
EAGER = ("--enforce-eager",)

# What a test server computes and holds unless the test sets its own limits. Warmup runs the
# largest prefill once and zeroes the KV cache: at the defaults (4,145 tokens, 4 GiB) that is ~15 s
# of a 25 s start on 2 cores; at these, 2 s. Longer prompts are chunked, as in any server.
TOKEN_LIMITS = ("--max-batch-prefill-tokens", "--max-input-tokens", "--max-batch-total-tokens")
TEST_PREFILL = ("--max-batch-prefill-tokens", "512")
TEST_KV_CACHE = ("--cpu-kv-cache-gb", "1")


def sized_for_tests(args: tuple[str, ...]) -> tuple[str, ...]:
    """`args` with TEST_PREFILL unless they set a token limit, and TEST_KV_CACHE unless they size the cache."""
    prefill = () if any(flag in args for flag in TOKEN_LIMITS) else TEST_PREFILL
    kv_cache = () if TEST_KV_CACHE[0] in args else TEST_KV_CACHE
    return (*prefill, *kv_cache, *args)


class LauncherProcess:
    """The launcher in a subprocess, sized for tests (see sized_for_tests) unless `as_users_start_it`."""

    def __init__(
        self,
        model_dir: Path,
        *args: str,
        num_shard: int = 1,
        env: dict[str, str] | None = None,
        as_users_start_it: bool = False,
    ):
        self.extra_env = env or {}
        self.port = free_port()
        self.tmp = tempfile.TemporaryDirectory(prefix="sluice-")
        self.argv = [
            sys.executable,
            "-m",
            "launcher",
            "--model-id",
            str(model_dir),
            "--num-shard",
            str(num_shard),
            "--hostname",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--master-port",
            str(free_port()),
            "--shard-uds-path",
            os.path.join(self.tmp.name, "shard"),
            *(args if as_users_start_it else sized_for_tests(args)),
        ]
        self.log_path = Path(self.tmp.name) / "launcher.log"
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 240) -> "LauncherProcess":
        env = dict(os.environ, HF_HUB_OFFLINE="1", **self.extra_env)
        self.process = subprocess.Popen(self.argv, stdout=self.log_path.open("w"), stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"launcher exited with {self.process.returncode}:\n{self.log()}")
            try:
                if requests.get(self.url + "/health", timeout=2).status_code == 200:
                    return self
            except (requests.ConnectionError, requests.Timeout):  # not listening yet, or too busy starting to answer
                pass
            time.sleep(0.25)
        log = self.log()  # before stop() removes the directory it is in
        self.stop()
        raise TimeoutError(f"launcher not ready in {timeout_s}s:\n{log}")

    def log(self) -> str:
        return "\n".join(self.log_path.read_text().splitlines()[-300:])  # whole lines

    def stop(self) -> int:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.tmp.cleanup()
        return self.process.returncode if self.process else 0

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
