"""The servers under test, started fresh (or attached to), with what a report needs to know of them.

Every server here has the same interface: `start()` (until `/health` answers; records
`startup_s`, launch to healthy), `url`, `pids` (its processes, named, for `probes.CpuMonitor`),
`describe()` (system, the dtype request, what was passed, what the server used, startup time;
for Sluice also `/info`'s `quantize` and `model_weight_bytes`), and `stop()` (always safe to
call; stops every process of the server). An attached server (a `url` given) is neither started
nor stopped. `SluiceInt8Server` is Sluice started with `--quantize int8` (weight-only int8), the
"sluice-int8" system that issue 16's figures compare with unquantized Sluice.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from urllib.parse import urlparse

from benchmarks import probes, procs
from benchmarks.ratios import SLUICE, SLUICE_INT8

ROOT = Path(__file__).resolve().parent.parent

# vLLM's CPU settings for this 2-core machine: a 4 GiB KV cache, OpenMP on both cores, none kept back.
VLLM_ENV = {
    "VLLM_CPU_KVCACHE_SPACE": "4",
    "VLLM_CPU_OMP_THREADS_BIND": "0-1",
    "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
    "HF_HUB_OFFLINE": "1",
}
VLLM_CPU_DEFAULT = "bfloat16"  # what vLLM's `auto` picks on a CPU with AVX-512 BF16 (its log says so)
_LOG_DTYPE = re.compile(r"\bdtype=torch\.(\w+)")


class SluiceServer:
    """sluice-launcher (via the tests' `LauncherProcess`), or a running Sluice at `url`."""

    system = SLUICE
    quantize: str | None = None  # `--quantize` passed to the launcher (None: not passed)

    def __init__(self, model_dir: Path, request: str, launcher_args: list[str], log_dir: Path, url: str | None = None):
        self.model_dir, self.request, self.launcher_args, self.log_dir = model_dir, request, launcher_args, log_dir
        self.url = url
        self.attached = url is not None
        self.startup_s: float | None = None
        self.pids: dict[str, int] = {}
        self.dtype: str | None = None
        self.quantize_used: str | None = None  # /info `quantize` (None: full precision)
        self.weight_bytes: int | None = None  # /info `model_weight_bytes`: the weights as served, over all shards
        self._launcher = None
        self._tree = []

    def passed_args(self) -> list[str]:
        """The launcher flags this benchmark chooses (`--launcher-args` follow them)."""
        return ["--dtype", self.request] + (["--quantize", self.quantize] if self.quantize else [])

    def start(self, timeout_s: float = 600) -> None:
        """Start the launcher with `--dtype <request>` (and `--quantize`, if any) or attach, then read back `/info`'s
        `model_dtype`, `quantize` and `model_weight_bytes`."""
        if self.attached:
            self._find_attached()
        else:
            sys.path.insert(0, str(ROOT))
            from tests.e2e.server import LauncherProcess

            self._launcher = LauncherProcess(
                self.model_dir, *self.passed_args(), *self.launcher_args, as_users_start_it=True
            )
            started = time.perf_counter()
            self._launcher.start(timeout_s=timeout_s)
            self.startup_s = time.perf_counter() - started
            self.url = self._launcher.url
            self._tree = procs.tree(self._launcher.process.pid)
            self.pids = probes.server_processes(self._launcher.process.pid) | {"launcher": self._launcher.process.pid}
        with urllib.request.urlopen(self.url + "/info", timeout=10) as resp:
            self.read_info(json.loads(resp.read()))

    def read_info(self, info: dict) -> None:
        """What the server says it serves (`quantize` and `model_weight_bytes` absent from an older router: None)."""
        self.dtype = info["model_dtype"]
        self.quantize_used = info.get("quantize")
        self.weight_bytes = info.get("model_weight_bytes")
        if self.quantize and self.quantize_used != self.quantize:
            said = self.quantize_used
            raise RuntimeError(f"{self.system}: passed --quantize {self.quantize} but /info says quantize={said!r}")

    def _find_attached(self) -> None:
        router = procs.listener(urlparse(self.url).port or 80)
        parent = router.parent() if router else None
        if parent and "launcher" in " ".join(parent.cmdline()):
            self.pids = probes.server_processes(parent.pid) | {"launcher": parent.pid}

    def describe(self) -> dict:
        return {
            "system": self.system,
            "request": self.request,
            "passed": None if self.attached else " ".join(self.passed_args()),
            "dtype": self.dtype,
            "dtype_source": "GET /info model_dtype",
            "quantize": self.quantize_used,
            "weight_bytes": self.weight_bytes,
            "weight_bytes_source": "GET /info model_weight_bytes",
            "startup_s": self.startup_s,
            "attached": self.attached,
        }

    def stop(self) -> None:
        """Stop the launcher (SIGTERM, then SIGKILL), then any of its processes it left behind."""
        if self._launcher is None:
            return
        self.log_dir.mkdir(parents=True, exist_ok=True)
        if self._launcher.log_path.exists():
            shutil.copy(self._launcher.log_path, self.log_dir / f"{self.system}-{self.request}.log")
        process = self._launcher.process
        seen = {p.pid: p for p in [*self._tree, *(procs.tree(process.pid) if process else [])]}
        try:
            self._launcher.stop()
        finally:
            procs.stop_survivors(list(seen.values()))
            self._launcher = None


class SluiceInt8Server(SluiceServer):
    """Sluice started with `--quantize int8` (weight-only int8 weights, activations in the dtype asked for):
    issue 16's quantized scheme, measured beside unquantized Sluice in the same pairing. Never attached."""

    system = SLUICE_INT8
    quantize = "int8"

    def __init__(self, model_dir: Path, request: str, launcher_args: list[str], log_dir: Path):
        super().__init__(model_dir, request, launcher_args, log_dir, None)


class VllmServer:
    """`vllm serve` from its own venv in a new session (so its whole tree can be stopped), or one at `url`."""

    system = "vllm"

    def __init__(
        self, venv: Path, model_dir: Path, request: str, extra_args: list[str], log_dir: Path, url: str | None = None
    ):
        self.venv, self.model_dir, self.request, self.extra_args = venv, model_dir, request, extra_args
        self.log_path = log_dir / f"vllm-{request}.log"
        self.url = url
        self.attached = url is not None
        self.startup_s: float | None = None
        self.pids: dict[str, int] = {}
        self.passed: str | None = None
        self.dtype: str | None = None
        self.dtype_source = ""
        self._proc: subprocess.Popen | None = None
        self._tree = []

    def argv(self, port: int) -> list[str]:
        """The `vllm serve` command: prefix caching off (runs reuse the same prompts), like Sluice."""
        return [
            str(self.venv / "bin" / "vllm"),
            "serve",
            str(self.model_dir),
            "--dtype",
            self.request,
            "--no-enable-prefix-caching",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            *self.extra_args,
        ]

    def start(self, timeout_s: float = 600) -> None:
        """Start `vllm serve --dtype <request>` and wait for `/health` (or attach); read its dtype from its log."""
        if self.attached:
            self._find_attached()
            return
        port = procs.free_port()
        self.url = f"http://127.0.0.1:{port}"
        self.passed = f"--dtype {self.request}"
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        with self.log_path.open("w") as log:
            self._proc = subprocess.Popen(
                self.argv(port),
                stdout=log,
                stderr=subprocess.STDOUT,
                env=os.environ | VLLM_ENV,
                cwd=ROOT,
                start_new_session=True,
            )
        try:
            procs.wait_healthy(self.url, self._proc, timeout_s, "vllm serve")
        except (RuntimeError, TimeoutError) as e:
            raise RuntimeError(f"{e}; its log ({self.log_path}) ends:\n{self.log_tail()}") from None
        self.startup_s = time.perf_counter() - started
        self._tree = procs.tree(self._proc.pid)
        self.pids = procs.named(self._tree, "vllm")
        found = _LOG_DTYPE.search(self.log_path.read_text(errors="replace"))
        self.dtype, self.dtype_source = (found.group(1), "its log") if found else (self.request, "as passed")

    def _find_attached(self) -> None:
        server = procs.listener(urlparse(self.url).port or 80)
        cmd = server.cmdline() if server else []
        self.passed = " ".join(cmd[cmd.index("--dtype") : cmd.index("--dtype") + 2]) if "--dtype" in cmd else None
        self.pids = procs.named(procs.tree(server.pid), "vllm") if server else {}
        passed = cmd[cmd.index("--dtype") + 1] if "--dtype" in cmd else "auto"
        self.dtype = VLLM_CPU_DEFAULT if passed == "auto" else passed
        self.dtype_source = f"attached; from its command line ({passed})" if server else "attached; assumed"

    def log_tail(self, lines: int = 40) -> str:
        """The end of the server's log, without the noisy per-weight lines."""
        if not self.log_path.exists():
            return ""
        text = [x for x in self.log_path.read_text(errors="replace").splitlines() if "Attempted to load" not in x]
        return "\n".join(text[-lines:])

    def describe(self) -> dict:
        return {
            "system": self.system,
            "request": self.request,
            "passed": self.passed,
            "dtype": self.dtype,
            "dtype_source": self.dtype_source,
            "startup_s": self.startup_s,
            "attached": self.attached,
            "log": None if self.attached else str(self.log_path),
        }

    def stop(self) -> None:
        """SIGTERM vLLM's process group and tree, SIGKILL what is left after 30 s."""
        if self._proc is not None:
            try:
                procs.stop_tree(self._proc, 30.0, self._tree)
            finally:
                self._proc = None
