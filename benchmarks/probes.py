"""What happens inside and around a run: the server's step metrics, CPU contention, py-spy profiles.

- `scrape` + `step_breakdown`: `GET /metrics` before and after a run. Per step method: the
  shard's forward time (`tgi_batch_forward_duration`; on a GPU the launch, the work being
  asynchronous), its time after the forward (`sluice_batch_sample_duration`: on a GPU the wait for
  the forward, then sampling and outputs), the send-to-receive time of a step
  (`tgi_batch_inference_duration`) and the router's time applying its tokens
  (`tgi_batch_decode_duration`). The router overlaps steps (step N+1 is sent while the shard
  computes step N), so send-to-receive includes waiting behind the previous step and "round trip
  - forward + apply" is an upper bound on router time, not the router's time. The figures that
  hold with overlap: the step period (run wall time / steps), the shard's busy share (forward
  time / wall time; the rest is sampling, gRPC, router bubbles and client gaps) and the router's
  CPU time per step (from the OS, whether or not it hides behind the forward).
- `CpuMonitor`: CPU seconds used by the machine, by this process tree and by the server's
  processes, to show when something else was competing for the cores (the other, idle servers
  of a pairing included, and also shown on their own); `settle` waits for those to go idle.
- `Profiler`: `py-spy record` of a process for the duration of a `with` block (speedscope JSON),
  and `top_functions` to summarise such a file.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from pathlib import Path

import psutil
from prometheus_client.parser import text_string_to_metric_families

_OUR_DIRS = ("/router/", "/shard/", "/launcher/")
_STEP_METRICS = (
    "tgi_batch_forward_duration",
    "sluice_batch_sample_duration",
    "tgi_batch_inference_duration",
    "tgi_batch_decode_duration",
)


def scrape(url: str) -> dict[tuple[str, str], float]:
    """{(sample name, method label): value} for the step histograms' _sum and _count."""
    with urllib.request.urlopen(url + "/metrics", timeout=10) as resp:
        text = resp.read().decode()
    out = {}
    for family in text_string_to_metric_families(text):
        if family.name in _STEP_METRICS:
            for s in family.samples:
                if s.name.endswith(("_sum", "_count")):
                    out[(s.name, s.labels.get("method", ""))] = s.value
    return out


def step_breakdown(before: dict, after: dict, wall_s: float, router_cpu_s: float | None = None) -> dict:
    """Between two scrapes: per method ("prefill", "decode") mean ms per step of each part, and for
    all steps together ("all") the step period, the shard's busy share and the router's CPU per step."""

    def delta(name: str, method: str) -> float:
        return after.get((name, method), 0.0) - before.get((name, method), 0.0)

    out: dict[str, dict[str, float]] = {}
    total_steps = total_forward = total_sample = 0.0
    for method in ("prefill", "decode"):
        steps = delta("tgi_batch_inference_duration_count", method)
        if steps <= 0:
            continue
        forward = delta("tgi_batch_forward_duration_sum", method)
        sample = delta("sluice_batch_sample_duration_sum", method)
        round_trip = delta("tgi_batch_inference_duration_sum", method) / steps
        apply = delta("tgi_batch_decode_duration_sum", method) / steps
        total_steps, total_forward, total_sample = total_steps + steps, total_forward + forward, total_sample + sample
        out[method] = {
            "steps": steps,
            "forward_ms": 1e3 * forward / steps,
            "sample_ms": 1e3 * sample / steps,
            "round_trip_ms": 1e3 * round_trip,
            "apply_ms": 1e3 * apply,
            # the formula of a non-overlapped router: (round trip - forward + apply) / (round trip + apply)
            "metric_overhead_pct": 100 * (round_trip - forward / steps + apply) / (round_trip + apply),
        }
    if total_steps and wall_s > 0:
        period = wall_s / total_steps
        out["all"] = {
            "steps": total_steps,
            "period_ms": 1e3 * period,
            "forward_ms": 1e3 * total_forward / total_steps,
            "sample_ms": 1e3 * total_sample / total_steps,
            "shard_busy_pct": 100 * total_forward / wall_s,
            "not_forward_pct": 100 * (1 - total_forward / wall_s),
            "router_cpu_ms": float("nan") if router_cpu_s is None else 1e3 * router_cpu_s / total_steps,
            "router_cpu_pct": float("nan") if router_cpu_s is None else 100 * router_cpu_s / wall_s,
        }
    return out


def _cpu_seconds(pids: list[int], children: bool = False) -> float:
    """User + system CPU seconds of `pids` (and, with `children`, of their children already reaped)."""
    total = 0.0
    for pid in pids:
        try:
            t = psutil.Process(pid).cpu_times()
            total += t.user + t.system + (t.children_user + t.children_system if children else 0.0)
        except psutil.NoSuchProcess:
            pass
    return total


class CpuMonitor:
    """CPU use during a `with` block: the whole machine, this process, the server's processes, and the
    processes of other servers kept resident meanwhile (`resident_pids`: counted as other load too)."""

    def __init__(self, server_pids: dict[str, int] | None = None, resident_pids: dict[str, int] | None = None):
        self.server_pids = server_pids or {}
        self.resident_pids = resident_pids or {}
        self.result: dict = {}

    def __enter__(self) -> CpuMonitor:
        self._wall = time.perf_counter()
        self._machine = _busy_seconds()
        self._own = _cpu_seconds([os.getpid()], children=True)
        self._server = {name: _cpu_seconds([pid]) for name, pid in self.server_pids.items()}
        self._resident = _cpu_seconds(list(self.resident_pids.values()))
        return self

    def __exit__(self, *exc) -> None:
        wall = time.perf_counter() - self._wall
        machine = _busy_seconds() - self._machine
        own = _cpu_seconds([os.getpid()], children=True) - self._own
        per_process = {name: _cpu_seconds([pid]) - self._server[name] for name, pid in self.server_pids.items()}
        server = sum(per_process.values())
        resident = max(0.0, _cpu_seconds(list(self.resident_pids.values())) - self._resident)
        cores = psutil.cpu_count() or 1
        self.result = {
            "wall_s": wall,
            "machine_busy_pct": 100 * machine / (wall * cores),
            "benchmark_pct": 100 * own / (wall * cores),
            "server_pct": 100 * server / (wall * cores),
            "other_pct": 100 * max(0.0, machine - own - server) / (wall * cores),
            "loadavg_1m_end": os.getloadavg()[0],
            "server_cpu_s": per_process,
        }
        if self.resident_pids:
            self.result["resident_pct"] = 100 * resident / (wall * cores)


def _busy_seconds() -> float:
    t = psutil.cpu_times()
    return t.user + t.nice + t.system + getattr(t, "irq", 0) + getattr(t, "softirq", 0) + getattr(t, "steal", 0)


def wait_quiet(max_busy_pct: float, timeout_s: float, interval_s: float = 3.0, intervals: int = 4) -> float:
    """Wait (at most `timeout_s`) until the machine's CPU use stayed under `max_busy_pct` for
    `intervals` consecutive intervals (this process idles meanwhile); returns the seconds waited."""
    start, quiet = time.monotonic(), 0
    while quiet < intervals and time.monotonic() - start < timeout_s:
        quiet = quiet + 1 if psutil.cpu_percent(interval=interval_s) < max_busy_pct else 0
    return time.monotonic() - start


def settle(
    pids: dict[str, int],
    max_pct: float = 5.0,
    interval_s: float = 0.25,
    intervals: int = 2,
    timeout_s: float = 30.0,
) -> float:
    """Wait (at most `timeout_s`) until the processes `pids` (servers meant to be idle) used under `max_pct` %
    of the machine's CPU for `intervals` consecutive intervals; returns the seconds waited. A server can keep
    its cores busy for seconds after its last request (vLLM's CPU build does, about 1 CPU-second), which
    would otherwise land on the next server's run."""
    start, quiet, cores = time.monotonic(), 0, psutil.cpu_count() or 1
    if not pids:
        return 0.0
    last_t, last = time.monotonic(), _cpu_seconds(list(pids.values()))
    while quiet < intervals and time.monotonic() - start < timeout_s:
        time.sleep(interval_s)
        now_t, now = time.monotonic(), _cpu_seconds(list(pids.values()))
        quiet = quiet + 1 if 100 * (now - last) / ((now_t - last_t) * cores) < max_pct else 0
        last_t, last = now_t, now
    return time.monotonic() - start


def server_processes(launcher_pid: int) -> dict[str, int]:
    """{"shard-0": pid, ..., "router": pid} among the launcher's children (by their `-m` module)."""
    out = {}
    for child in psutil.Process(launcher_pid).children(recursive=True):
        cmd = child.cmdline()
        if "-m" in cmd:
            module = cmd[cmd.index("-m") + 1]
            if module == "router":
                out["router"] = child.pid
            elif module == "shard":
                rank = cmd[cmd.index("--rank") + 1] if "--rank" in cmd else str(len(out))
                out[f"shard-{rank}"] = child.pid
    return out


class Profiler:
    """`py-spy record` of `pid` (all threads, idle excluded) for the duration of a `with` block."""

    def __init__(self, pid: int, out: Path, rate: int = 50):
        self.pid, self.out, self.rate = pid, out, rate
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> Profiler:
        exe = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
        cmd = [exe, "record", "--pid", str(self.pid), "--rate", str(self.rate)]
        cmd += ["--format", "speedscope", "--output", str(self.out), "--nonblocking"]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        time.sleep(1.0)  # py-spy attaches
        return self

    def __exit__(self, *exc) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGINT)  # py-spy writes its file on SIGINT
        try:
            _, err = self.proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            _, err = self.proc.communicate()
        if not self.out.exists():
            raise RuntimeError(f"py-spy wrote no profile: {err.decode()[-500:]}")


def top_functions(speedscope: Path, n: int = 10) -> dict:
    """The `n` functions with the most non-idle time, as % of all of it: "self" (on top of the stack, any
    code) and "total" (anywhere in the stack; Sluice's own functions only), and sampled seconds per thread."""
    data = json.loads(speedscope.read_text())
    shared = data["shared"]["frames"]
    frames = [f"{f['name']} ({Path(f.get('file', '?')).name}:{f.get('line', '?')})" for f in shared]
    ours = {i for i, f in enumerate(shared) if any(d in f.get("file", "") for d in _OUR_DIRS)}
    self_s, total_s, threads = Counter(), Counter(), {}
    for profile in data["profiles"]:
        threads[profile["name"]] = sum(profile["weights"])
        for stack, weight in zip(profile["samples"], profile["weights"]):
            if stack:
                self_s[frames[stack[-1]]] += weight
                for name in {frames[i] for i in stack if i in ours}:
                    total_s[name] += weight
    seconds = sum(threads.values())
    pct = 100 / seconds if seconds else 0.0
    return {
        "seconds": seconds,
        "threads": threads,
        "self": [(name, w * pct) for name, w in self_s.most_common(n)],
        "total": [(name, w * pct) for name, w in total_s.most_common(n)],
    }
