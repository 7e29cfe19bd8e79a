"""Everything measured on one server start, in a fixed order.

After the start: one small warm-up request (not measured); the largest concurrency twice, "first"
(right after the warm-up: what a cold server does) and "repeat" (the figure the tables use); the
other concurrencies from large to small; Poisson runs if asked; then, if asked, the long-prompt
probe and (Sluice only) a py-spy profile. Every run goes through `measure` (rerun after contention).
"""

from __future__ import annotations

import argparse
import asyncio

from benchmarks import long_prompt, probes
from benchmarks.loadgen import run_load, warm_up
from benchmarks.measure import log, measure
from benchmarks.metrics import summarize
from benchmarks.ratios import FIRST, REPEAT
from benchmarks.workload import RequestSpec


def load_sequence(levels: list[int]) -> list[tuple[int, str | None]]:
    """[(concurrency, phase)]: the largest twice ("first", "repeat"), then the others from large to small."""
    order = sorted(set(levels), reverse=True)
    if not order:
        return []
    return [(order[0], FIRST), (order[0], REPEAT), *((c, None) for c in order[1:])]


def run_entry(system: str, dtype: str | None, c, specs, records, duration, cpu, rate=None, phase=None, **extra) -> dict:
    """One run's entry in results.json (see ratios.py for how entries are compared)."""
    summary = summarize(records, duration)
    name = f"{system} {dtype}" if dtype else system
    log(
        f"{name} C={c}{f' ({phase})' if phase else ''} rate={rate} n={len(specs)}: "
        f"{summary['output_throughput']:.1f} out tok/s, TPOT {1e3 * summary['tpot_s']['mean']:.0f} ms, "
        f"TTFT {1e3 * summary['ttft_s']['mean']:.0f} ms, {duration:.1f} s, "
        f"other load {cpu.get('other_pct', float('nan')):.0f}%"
    )
    return {
        "system": system,
        "dtype": dtype,
        "concurrency": c,
        "phase": phase,
        "rate": rate,
        "num_requests": len(specs),
        "summary": summary,
        "records": [r.to_json() for r in records],
        "cpu": cpu,
        **extra,
    }


def server_runs(
    args: argparse.Namespace,
    server,
    specs: list[RequestSpec],
    plan: dict[int, int],
    probe: long_prompt.ProbeConfig | None = None,
    profile: bool = False,
) -> dict:
    """{"runs": [...], "long_prompt": {...} | None, "profile": {...}} for a started server (see servers.py)."""
    url, system, dtype, pids = server.url, server.system, server.dtype, server.pids
    scrape = system == "sluice"
    asyncio.run(warm_up(url, args.api, specs[0]))
    loads = [(c, None, phase, specs[: plan[c]]) for c, phase in load_sequence(levels(args, system))]
    loads += [(None, rate, None, specs) for rate in args.rates]
    runs = []
    for c, rate, phase, subset in loads:

        def one(c=c, rate=rate, subset=subset):
            before = probes.scrape(url) if scrape else {}
            records, duration = asyncio.run(run_load(url, subset, args.api, c, rate or float("inf"), args.seed))
            return before, probes.scrape(url) if scrape else {}, records, duration

        label = f"{system} {dtype} C={c}{f' ({phase})' if phase else ''}"
        (before, after, records, duration), cpu = measure(args, label, one, pids)
        extra = {}
        if scrape:
            extra["server_steps"] = probes.step_breakdown(before, after, duration, cpu["server_cpu_s"].get("router"))
        runs.append(run_entry(system, dtype, c, subset, records, duration, cpu, rate, phase, **extra))
    out = {"runs": runs, "long_prompt": None, "profile": {}}
    if probe is not None:
        log(f"{system} {dtype}: long-prompt probe ({probe.long_tokens} tokens into {probe.streams} decoding streams)")
        result, cpu = measure(
            args,
            f"{system} {dtype} long prompt",
            lambda: asyncio.run(long_prompt.run_probe(url, args.model_dir, probe, args.seed)),
            pids,
        )
        out["long_prompt"] = {"system": system, "dtype": dtype, **result, "cpu": cpu}
        log(
            f"{system} {dtype} long prompt: median ITL {1e3 * result['median_itl_s']:.0f} ms, worst during the "
            f"arrival {1e3 * result['worst_window_itl_s']:.0f} ms ({result['window_worst_over_median']:.1f}x)"
        )
    if profile and "shard-0" in pids:
        out["profile"] = profile_run(args, url, pids, specs[: args.profile_requests])
    return out


def levels(args: argparse.Namespace, system: str) -> list[int]:
    """The closed-loop concurrencies `system` runs at (`--concurrency` less `--skip system:C`)."""
    return [c for c in args.concurrency if f"{system}:{c}" not in args.skip]


def profile_run(args: argparse.Namespace, url: str, pids: dict[str, int], specs: list[RequestSpec]) -> dict:
    """One extra Sluice run at `--profile` concurrency under py-spy (shard 0 and router); not in the table."""
    args.out.mkdir(parents=True, exist_ok=True)
    files = {name: args.out / f"{name}.speedscope.json" for name in ("shard", "router")}
    log(f"profiling sluice at C={args.profile} with py-spy")

    def one():
        with probes.Profiler(pids["shard-0"], files["shard"]), probes.Profiler(pids["router"], files["router"]):
            return asyncio.run(run_load(url, specs, args.api, args.profile, float("inf"), args.seed))

    (records, duration), cpu = measure(args, "profile", one, pids)
    out = {
        "concurrency": args.profile,
        "num_requests": len(specs),
        "summary": summarize(records, duration),
        "cpu": cpu,
        "files": {k: str(v) for k, v in files.items()},
    }
    for name, path in files.items():
        out[name] = probes.top_functions(path)
    return out
