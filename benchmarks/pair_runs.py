"""One dtype pairing end to end: its servers started (pair_servers.py), measured interleaved, stopped.

With every server of the pairing started and resident:

1. a warm-up request to each (not measured), then, once every server is idle again, the machine's
   memory bandwidth (drift.py);
2. the loads in schedule.py's order: the largest concurrency A B A B (each server's "first", then
   each one's "repeat"), each other concurrency from large to small A B B A; each run is measured
   with the other servers idle beside it (`measure` first waits for them to go idle: vLLM stays busy
   for a few seconds after its load; then their CPU counts as other load, and a run that met
   contention runs again); then Poisson runs if asked (A B); then the memory bandwidth again;
3. in the first pairing only: the long-prompt probe on each server (Sluice, then the peers), then
   the constrained-decoding probe on Sluice (constrained.py, if asked), then the py-spy profile of Sluice;
   a variant of Sluice (ratios.VARIANTS: "sluice-int8", first pairing only) runs only the closed-loop
   loads of step 2, interleaved with the others, and stays resident, idle, through the rest;
4. every server stopped, on success, errors, Ctrl-C and SIGTERM alike (an ExitStack unwinds them).

A server whose warm-up, run or probe fails is stopped at once and left out of the rest of the
pairing; its figures so far stay, the other servers carry on, and the error is reported.
"""

from __future__ import annotations

import argparse
import contextlib

from benchmarks import drift, pairing, probes
from benchmarks.constrained import probe_specs
from benchmarks.measure import Phases, log
from benchmarks.options import constrained_requests, probe_config
from benchmarks.pair_servers import Collected, start_servers
from benchmarks.ratios import VARIANTS
from benchmarks.schedule import interleave, run_name
from benchmarks.server_runs import constrained_run, levels, load_run, probe_run, profile_run, warm
from benchmarks.workload import RequestSpec


class _Pairing:
    """The servers of one pairing still in it (in start order), and how to drop one that failed."""

    def __init__(self, request: str, started: list, out: Collected):
        self.request, self.out = request, out
        self.live = {server.system: (server, stop) for server, stop in started}

    def servers(self, variants: bool = True) -> list:
        """The servers still in the pairing; without Sluice's variants (ratios.VARIANTS) unless `variants`."""
        return [server for server, _ in self.live.values() if variants or server.system not in VARIANTS]

    def resident(self, system: str | None = None) -> dict[str, int]:
        """The processes of the pairing's servers other than `system` (idle while it runs); all of them for None."""
        return {f"{s.system}:{k}": pid for s in self.servers() if s.system != system for k, pid in s.pids.items()}

    def attempt(self, server, step: str, fn, *a, **kw) -> None:
        """fn(*a, **kw); if it fails, the server is reported, stopped and left out of the rest."""
        try:
            fn(*a, **kw)
        except Exception as e:
            self.out.error(server, self.request, step, e)
            _, stop = self.live.pop(server.system)
            stop()


def _loads(args: argparse.Namespace, pair: _Pairing, specs: list[RequestSpec], plan: dict[int, int]) -> None:
    """Warm-ups, the interleaved runs and the drift check around them."""
    out, request = pair.out, pair.request
    for server in pair.servers():
        pair.attempt(server, "warm-up", warm, args, server, specs)
    slots = interleave({s.system: levels(args, s.system) for s in pair.servers()})
    if not slots and not args.rates:
        return
    name = pairing.pairing_name(request)
    probes.settle(pair.resident())  # every server idle (a warm-up leaves vLLM busy for a while)
    before = drift.memory_bandwidth_gbs()
    log(f"{name} pairing: memory bandwidth {before:.1f} GB/s before its runs")
    for order, slot in enumerate(slots, 1):
        server, _ = pair.live.get(slot.system, (None, None))
        if server is None:
            continue
        c = slot.concurrency

        def one(server=server, slot=slot, c=c, order=order):
            resident = pair.resident(server.system)
            tags = {"round": slot.round, "order": order, "pairing": request}
            out.runs.append(load_run(args, server, c, specs[: plan[c]], None, slot.phase, resident, **tags))

        pair.attempt(server, run_name(c, slot.phase, slot.round), one)
    for rate in args.rates:
        for server in pair.servers(variants=False):

            def poisson(server=server, rate=rate):
                resident = pair.resident(server.system)
                out.runs.append(load_run(args, server, None, specs, rate, None, resident, pairing=request))

            pair.attempt(server, f"rate {rate}/s", poisson)
    probes.settle(pair.resident())
    after = drift.memory_bandwidth_gbs()
    out.drift.append(drift.check(name, before, after))
    log(drift.note(out.drift[-1]))


def _probes(
    args: argparse.Namespace, pair: _Pairing, specs: list[RequestSpec], plan: dict[int, int], phases: Phases
) -> None:
    """The long-prompt probe on each server but Sluice's variants, then Sluice's constrained-decoding probe and
    profile (first pairing only)."""
    out, request, probe = pair.out, pair.request, probe_config(args)
    for server in pair.servers(variants=False) if probe is not None else []:

        def one(server=server):
            entry = probe_run(args, server, probe, pair.resident(server.system))
            out.long_prompt.append(entry)

        phases.timed(f"{server.system} {request} long prompt", pair.attempt, server, "long prompt", one)
    sluice = pair.live.get("sluice", (None, None))[0]
    if args.constrained > 0 and sluice is not None:
        c = args.constrained_concurrency
        chosen = probe_specs(specs, constrained_requests(args, plan), args.constrained_tokens)

        def constrained():
            resident = pair.resident("sluice")
            out.constrained = constrained_run(args, sluice, chosen, c, args.constrained, resident)

        phases.timed(f"sluice {request} constrained", pair.attempt, sluice, "constrained", constrained)
        sluice = pair.live.get("sluice", (None, None))[0]  # gone if the probe failed
    if args.profile and sluice is not None and "shard-0" in sluice.pids:

        def profile():
            resident = pair.resident("sluice")
            out.profile = profile_run(args, sluice.url, sluice.pids, specs[: args.profile_requests], resident)

        phases.timed(f"sluice {request} profile", pair.attempt, sluice, "profile", profile)


def pairing_runs(
    args: argparse.Namespace,
    request: str,
    first: bool,
    specs: list[RequestSpec],
    plan: dict[int, int],
    phases: Phases,
    out: Collected,
) -> None:
    """Start, measure and stop the servers of the pairing `request`, adding what was measured to `out`."""
    with contextlib.ExitStack() as stack:  # stops every server started here, whatever happens
        pair = _Pairing(request, start_servers(args, request, first, phases, out, stack), out)
        if not pair.live:
            return
        systems = ", ".join(pair.live)
        phases.timed(f"{request} runs ({systems} interleaved)", _loads, args, pair, specs, plan)
        if first:
            _probes(args, pair, specs, plan, phases)
