"""What is measured on a started server (see servers.py), one piece at a time; pair_runs.py orders them.

- `warm`: one small request, not measured (first-call costs);
- `load_run`: one measured closed-loop (or Poisson) run, through `measure` (run again after contention);
- `probe_run`: the long-prompt probe (long_prompt.py);
- `constrained_run`: the constrained-decoding probe (constrained.py), Sluice only;
- `profile_run`: one extra Sluice run under py-spy, not in the tables.

`resident` in each is the other servers' processes, kept running (idle) meanwhile: their CPU time
counts as other load (see probes.CpuMonitor).
"""

from __future__ import annotations

import argparse
import asyncio

from benchmarks import constrained, long_prompt, probes
from benchmarks.loadgen import run_load, warm_up
from benchmarks.measure import log, measure
from benchmarks.metrics import summarize
from benchmarks.ratios import SLUICE, SLUICE_INT8
from benchmarks.schedule import run_name
from benchmarks.workload import RequestSpec


def run_entry(system: str, dtype: str | None, c, specs, records, duration, cpu, rate=None, phase=None, **extra) -> dict:
    """One run's entry in results.json (see ratios.py for how entries are compared)."""
    summary = summarize(records, duration)
    name = f"{system} {dtype}" if dtype else system
    log(
        f"{name} {run_name(c, phase, extra.get('round'))} rate={rate} n={len(specs)}: "
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


def warm(args: argparse.Namespace, server, specs: list[RequestSpec]) -> None:
    """One short request to a freshly started server, not measured."""
    asyncio.run(warm_up(server.url, args.api, specs[0]))


def load_run(
    args: argparse.Namespace,
    server,
    c: int | None,
    specs: list[RequestSpec],
    rate: float | None = None,
    phase: str | None = None,
    resident: dict[str, int] | None = None,
    **tags,
) -> dict:
    """One measured run of `specs` on `server` (closed loop of `c` clients, or Poisson at `rate`).

    `tags` (round, order, pairing) go into the entry as they are; a Sluice entry (sluice-int8 too) also has
    `server_steps`.
    """
    url, system, dtype, pids = server.url, server.system, server.dtype, server.pids
    scrape = system in (SLUICE, SLUICE_INT8)

    def one():
        before = probes.scrape(url) if scrape else {}
        records, duration = asyncio.run(run_load(url, specs, args.api, c, rate or float("inf"), args.seed))
        return before, probes.scrape(url) if scrape else {}, records, duration

    label = f"{system} {dtype} {run_name(c, phase, tags.get('round'))}"
    (before, after, records, duration), cpu = measure(args, label, one, pids, resident)
    extra = dict(tags)
    if scrape:
        extra["server_steps"] = probes.step_breakdown(before, after, duration, cpu["server_cpu_s"].get("router"))
    return run_entry(system, dtype, c, specs, records, duration, cpu, rate, phase, **extra)


def probe_run(
    args: argparse.Namespace, server, probe: long_prompt.ProbeConfig, resident: dict[str, int] | None = None
) -> dict:
    """The long-prompt probe on `server`: its summary, raw token times and CPU use."""
    system, dtype = server.system, server.dtype
    log(f"{system} {dtype}: long-prompt probe ({probe.long_tokens} tokens into {probe.streams} decoding streams)")
    result, cpu = measure(
        args,
        f"{system} {dtype} long prompt",
        lambda: asyncio.run(long_prompt.run_probe(server.url, args.model_dir, probe, args.seed)),
        server.pids,
        resident,
    )
    log(
        f"{system} {dtype} long prompt: median ITL {1e3 * result['median_itl_s']:.0f} ms, worst during the "
        f"arrival {1e3 * result['worst_window_itl_s']:.0f} ms ({result['window_worst_over_median']:.1f}x)"
    )
    return {"system": system, "dtype": dtype, **result, "cpu": cpu}


def constrained_run(
    args: argparse.Namespace,
    server,
    specs: list[RequestSpec],
    c: int,
    runs: int,
    resident: dict[str, int] | None = None,
) -> dict:
    """The constrained-decoding probe on `server`: `specs` at concurrency `c`, unconstrained and constrained
    to constrained.SCHEMA in turns (`runs` of each), after one constrained warm-up request; its figures, each
    run's summary, step breakdown, CPU use and bad outputs. Raises if a request fails."""
    url, system, dtype, pids = server.url, server.system, server.dtype, server.pids
    tokens = sum(s.max_tokens for s in specs)
    log(f"{system} {dtype}: constrained-decoding probe, C={c}, {len(specs)} requests ({tokens} tokens) x {runs} runs")
    extra = {"response_format": constrained.RESPONSE_FORMAT}
    asyncio.run(warm_up(url, "openai", specs[0], extra))  # compiles (and caches) the grammar
    entries = []
    for mode, round_ in constrained.order(runs):
        is_constrained = mode == constrained.CONSTRAINED

        def one(body=extra if is_constrained else None, keep_text=is_constrained):
            before = probes.scrape(url)
            records, duration = asyncio.run(run_load(url, specs, "openai", c, float("inf"), args.seed, body, keep_text))
            return before, probes.scrape(url), records, duration

        label = f"{system} {dtype} {mode} C={c} (run {round_})"
        (before, after, records, duration), cpu = measure(args, label, one, pids, resident)
        failed = [r for r in records if r.error]
        if failed:
            raise RuntimeError(f"{label}: {len(failed)} of {len(records)} requests failed: {failed[0].error}")
        summary = summarize(records, duration)
        bad = constrained.bad_outputs(records, specs) if is_constrained else []
        steps = probes.step_breakdown(before, after, duration, cpu["server_cpu_s"].get("router"))
        log(
            f"{label}: {summary['output_throughput']:.1f} out tok/s, TPOT {1e3 * summary['tpot_s']['mean']:.0f} ms, "
            f"{duration:.1f} s, other load {cpu.get('other_pct', float('nan')):.0f}%"
            + (f", {len(bad)} of {len(records)} outputs bad" if is_constrained else "")
        )
        entries.append(
            {"mode": mode, "round": round_, "summary": summary, "server_steps": steps, "cpu": cpu}
            | {"bad_count": len(bad), "bad": bad[:5]}  # the first few as examples
        )
    result = constrained.summarize_runs(entries)
    log(
        f"{system} {dtype} constrained: {result['constrained']['tok_s']:.1f} vs {result['unconstrained']['tok_s']:.1f} "
        f"out tok/s unconstrained, ratio {result['ratio']:.2f} (target >= {constrained.TARGET}), "
        f"{result['bad_outputs']} of {result['outputs_checked']} constrained outputs bad"
    )
    return {
        "system": system,
        "dtype": dtype,
        "concurrency": c,
        "num_requests": len(specs),
        "output_tokens": tokens,
        "schema": constrained.SCHEMA,
        **result,
        "runs": entries,
    }


def levels(args: argparse.Namespace, system: str) -> list[int]:
    """The closed-loop concurrencies `system` runs at (`--concurrency` less `--skip system:C`)."""
    return [c for c in args.concurrency if f"{system}:{c}" not in args.skip]


def profile_run(
    args: argparse.Namespace,
    url: str,
    pids: dict[str, int],
    specs: list[RequestSpec],
    resident: dict[str, int] | None = None,
) -> dict:
    """One extra Sluice run at `--profile` concurrency under py-spy (shard 0 and router); not in the table."""
    args.out.mkdir(parents=True, exist_ok=True)
    files = {name: args.out / f"{name}.speedscope.json" for name in ("shard", "router")}
    log(f"profiling sluice at C={args.profile} with py-spy")

    def one():
        with probes.Profiler(pids["shard-0"], files["shard"]), probes.Profiler(pids["router"], files["router"]):
            return asyncio.run(run_load(url, specs, args.api, args.profile, float("inf"), args.seed))

    (records, duration), cpu = measure(args, "profile", one, pids, resident)
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
