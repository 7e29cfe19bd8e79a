"""Measuring under contention: a run that competed with other processes for the cores is run again."""

from __future__ import annotations

import argparse
import sys
import time

from benchmarks import probes


def log(msg: str) -> None:
    """A timestamped progress line on stderr."""
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def measure(
    args: argparse.Namespace,
    label: str,
    fn,
    pids: dict[str, int] | None = None,
    resident: dict[str, int] | None = None,
):
    """(fn(), CPU use) for a run in which other processes used at most `--max-other-load` % of the CPU.

    A shared machine's other work skews every figure, so a run that competed for the cores is
    run again (at most `--retries` times) once the machine is quiet; the last attempt is kept.
    `pids` are the server's processes: their CPU time is the server's, not "other". `resident` are
    the processes of other servers kept running meanwhile: "other" load, also reported on their own;
    before each attempt they are given time to go idle (`probes.settle`, recorded as `settle_s`).
    """
    for attempt in range(args.retries + 1):
        settled = probes.settle(resident or {})
        if settled > 1.0:
            log(f"{label}: waited {settled:.1f} s for the other servers to go idle")
        with probes.CpuMonitor(pids, resident) as cpu:
            out = fn()
        other = cpu.result["other_pct"]
        if other <= args.max_other_load or attempt == args.retries:
            return out, cpu.result | {"attempts": attempt + 1, "settle_s": settled}
        log(f"{label}: other processes used {other:.0f}% of the CPU; waiting for a quiet machine to run it again")
        waited = probes.wait_quiet(args.max_other_load, args.quiet_timeout)
        args.waited_s += waited
        log(f"{label}: waited {waited:.0f} s")


class Phases:
    """Wall time of each named phase of the benchmark (server starts, runs, baselines), in order."""

    def __init__(self) -> None:
        self.rows: list[tuple[str, float]] = []

    def timed(self, name: str, fn, *a, **kw):
        """fn(*a, **kw), its wall time recorded under `name` (also when it raises)."""
        start = time.perf_counter()
        try:
            return fn(*a, **kw)
        finally:
            self.rows.append((name, time.perf_counter() - start))
            log(f"phase {name}: {self.rows[-1][1]:.1f} s")
