"""Starting the servers of one dtype pairing, one after the other, each with its stop registered first.

For a pairing (a `--dtypes` request, see pairing.py) every system (Sluice, then each peer) either
starts a server with that request, or reuses an earlier start that already resolved to the dtype
asked for (its runs stand for both pairings; the systems that do start then run without it), or,
attached to a running server that an earlier pairing used, is not run again. Starts are one after
the other, so each startup time is measured alone; the servers already started stay resident, idle.
A variant of Sluice (ratios.VARIANTS: "sluice-int8") starts in the first pairing only, and only
where it has load runs there.

A server's stop is registered on the caller's ExitStack before it starts, so that every server is
stopped whatever happens (error, Ctrl-C, SIGTERM), and runs at most once: right away when the server
fails (to start, or later), else when the pairing ends.
"""

from __future__ import annotations

import argparse
import contextlib
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks import pairing
from benchmarks.measure import Phases, log
from benchmarks.options import probe_config
from benchmarks.ratios import SLUICE, SLUICE_INT8, VARIANTS
from benchmarks.server_runs import levels
from benchmarks.servers import SluiceInt8Server, SluiceServer, VllmServer

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Collected:
    """What the pairings measured, for results.json (see run.py)."""

    resolved: dict[str, dict[str, str]] = field(default_factory=dict)  # {system: {request: dtype used}}
    servers: list[dict] = field(default_factory=list)
    runs: list[dict] = field(default_factory=list)
    long_prompt: list[dict] = field(default_factory=list)
    constrained: dict = field(default_factory=dict)  # the constrained-decoding probe (constrained.py)
    profile: dict = field(default_factory=dict)
    drift: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def error(self, server, request: str, step: str, e: BaseException) -> None:
        """Record a server's failure (its figures so far stay; the benchmark exits non-zero at the end)."""
        log(f"{server.system} --dtype {request} failed ({step}): {e}")
        self.errors.append(f"ERROR: {server.system} --dtype {request} ({step}): {type(e).__name__}: {str(e)[-2000:]}")


class Stop:
    """A server's stop, timed as a phase, run at most once (safe to call again)."""

    def __init__(self, server, request: str, phases: Phases):
        self.server, self.name, self.phases, self.done = server, f"{server.system} {request} stop", phases, False

    def __call__(self) -> None:
        if not self.done:
            self.done = True
            self.phases.timed(self.name, self.server.stop)


def attach_url(args: argparse.Namespace, system: str) -> str | None:
    """The running server `system` attaches to (`--url`, `--vllm-url`), or None: started fresh."""
    return {SLUICE: args.url, "vllm": args.vllm_url}.get(system)


def make_server(args: argparse.Namespace, system: str, request: str):
    """A not yet started server of `system` for the dtype `request` (attached where a URL was given)."""
    if system == SLUICE:
        return SluiceServer(ROOT / args.model_dir, request, args.launcher_args.split(), args.out, args.url)
    if system == SLUICE_INT8:  # the same launcher flags as Sluice, and `--quantize int8`
        return SluiceInt8Server(ROOT / args.model_dir, request, args.launcher_args.split(), args.out)
    return VllmServer(args.vllm_venv, ROOT / args.model_dir, request, args.vllm_args.split(), args.out, args.vllm_url)


def wanted(args: argparse.Namespace, system: str, first: bool) -> bool:
    """Whether `system` has anything to run in a pairing (`first`: the pairing that probes and profiles).

    A variant (ratios.VARIANTS) runs only the first pairing's closed-loop loads."""
    if system in VARIANTS:
        return first and bool(levels(args, system))
    sluice_extras = system == SLUICE and (bool(args.profile) or args.constrained > 0)
    extras = first and (probe_config(args) is not None or sluice_extras)
    return bool(levels(args, system) or args.rates or extras)


def _reuse(out: Collected, system: str, request: str) -> bool:
    """Let an earlier start of `system` that already serves `request` stand for it; whether one did."""
    done = out.resolved.setdefault(system, {})
    earlier = pairing.covered_by(request, done)
    if earlier is None:
        return False
    done[request] = done[earlier]
    next(s for s in out.servers if s["system"] == system and s["request"] == earlier)["serves"].append(request)
    out.notes.append(
        f"{system} --dtype {request}: the `{earlier}` start already ran {done[earlier]}; its runs stand for both"
    )
    return True


def start_servers(
    args: argparse.Namespace, request: str, first: bool, phases: Phases, out: Collected, stack: contextlib.ExitStack
) -> list[tuple[object, Stop]]:
    """Start the pairing's servers in order; [(server, its stop)] for those that started."""
    started, reused = [], []
    for system in (SLUICE, *args.peers):
        if not wanted(args, system, first):
            continue
        if _reuse(out, system, request):
            reused.append(system)
            continue
        attached = attach_url(args, system) is not None
        if attached and any(s["system"] == system for s in out.servers):
            out.notes.append(f"{system} --dtype {request}: not run (attached to one running server)")
            continue
        server = make_server(args, system, request)
        stop = Stop(server, request, phases)
        stack.callback(stop)
        passed = " ".join(server.passed_args()) if hasattr(server, "passed_args") else f"--dtype {request}"
        log(f"{system}: attaching to {server.url}" if attached else f"{system}: starting with {passed}")
        try:
            phases.timed(f"{system} {request} start", server.start, args.startup_timeout)
        except Exception as e:  # one server's failure leaves the others' figures; main exits non-zero
            out.error(server, request, "start", e)
            stop()
            continue
        log(f"{system} --dtype {request}: uses {server.dtype}, healthy after {server.startup_s or 0:.0f} s")
        out.resolved[system][request] = server.dtype
        out.servers.append(server.describe() | {"serves": [request]})
        started.append((server, stop))
    if reused and started:
        ran = ", ".join(s.system for s, _ in started)
        out.notes.append(
            f"pairing {pairing.pairing_name(request)}: {ran} ran without {', '.join(reused)} (whose earlier runs "
            "stand for it): these runs were not interleaved with them"
        )
    return started
