"""Benchmark entry point: Sluice (started here, or `--url`) and the transformers baselines.

    python -m benchmarks.run --concurrency 1 8 32 --requests-at 1=8     # see `make bench`

Every system at concurrency C runs the same first n(C) requests of the workload (n(C) = the
workload's size unless `--requests-at C=n` lowers it for time), so every compared figure comes
from the same prompts and lengths. Writes `benchmarks/out/results.json` (plus a timestamped
copy), prints the tables and saves `throughput.png` and `latency_cdf.png` next to it.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import subprocess
import sys
import time
from pathlib import Path

from benchmarks import baselines, probes, report
from benchmarks.loadgen import APIS, run_load, warm_up
from benchmarks.metrics import summarize
from benchmarks.workload import RequestSpec, make_requests, nano_vllm_requests

ROOT = Path(__file__).resolve().parent.parent


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-dir", default="models/SmolLM2-135M-Instruct")
    p.add_argument("--url", help="attach to a running server instead of starting one")
    p.add_argument(
        "--launcher-args",
        default="--prefix-caching false --max-concurrent-requests 1024",
        help="extra sluice-launcher flags (prefix caching off: runs reuse the same prompts)",
    )
    p.add_argument("--api", choices=APIS, default="openai")
    p.add_argument("--workload", choices=("random", "nano-vllm"), default="random")
    p.add_argument("--num-requests", type=int, default=64)
    p.add_argument("--prompt-len", type=int, nargs=2, default=(32, 256), metavar=("MIN", "MAX"))
    p.add_argument("--output-len", type=int, nargs=2, default=(128, 128), metavar=("MIN", "MAX"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument(
        "--requests-at",
        nargs="*",
        default=[],
        metavar="C=N",
        help="run only the first N requests at concurrency C (all systems alike)",
    )
    p.add_argument("--rates", type=float, nargs="*", default=[], help="also run Sluice with Poisson arrivals")
    p.add_argument("--baselines", nargs="*", default=list(baselines.BASELINES), choices=baselines.BASELINES)
    p.add_argument("--skip", nargs="*", default=[], metavar="SYSTEM:C", help="cells not to run, e.g. static:1")
    p.add_argument(
        "--pipeline-max-requests",
        type=int,
        default=None,
        help="pipeline serves at most this many requests; concurrencies needing more skip it",
    )
    p.add_argument("--cb-max-batch-tokens", type=int, default=512, help="transformers continuous batching budget")
    p.add_argument("--device", default="cpu", help="for the baselines (Sluice picks its own)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    p.add_argument("--profile-requests", type=int, default=32, help="requests in the profiled run")
    p.add_argument(
        "--profile",
        type=int,
        default=None,
        metavar="C",
        help="after the measured runs, py-spy one extra Sluice run at concurrency C",
    )
    p.add_argument(
        "--max-other-load",
        type=float,
        default=10.0,
        help="%% of the machine's CPU other processes may use during a run before it is run again",
    )
    p.add_argument("--retries", type=int, default=2, help="runs again after contention, at most this many times")
    p.add_argument("--quiet-timeout", type=float, default=900, help="longest wait (s) for a quiet machine")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "out")
    return p.parse_args(argv)


def requests_plan(args: argparse.Namespace) -> dict[int, int]:
    caps = {int(c): int(n) for c, n in (x.split("=") for x in args.requests_at)}
    return {c: min(args.num_requests, caps.get(c, args.num_requests)) for c in args.concurrency}


def workload(args: argparse.Namespace) -> list[RequestSpec]:
    if args.workload == "nano-vllm":
        return nano_vllm_requests(args.model_dir, args.num_requests, args.seed)
    return make_requests(args.model_dir, args.num_requests, tuple(args.prompt_len), tuple(args.output_len), args.seed)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def measure(args: argparse.Namespace, label: str, fn, pids: dict[str, int] | None = None):
    """(fn(), CPU use) for a run in which other processes used at most `--max-other-load` % of the CPU.

    A shared machine's other work skews every figure, so a run that competed for the cores is
    run again (at most `--retries` times) once the machine is quiet; the last attempt is kept.
    """
    for attempt in range(args.retries + 1):
        with probes.CpuMonitor(pids) as cpu:
            out = fn()
        other = cpu.result["other_pct"]
        if other <= args.max_other_load or attempt == args.retries:
            return out, cpu.result | {"attempts": attempt + 1}
        log(f"{label}: other processes used {other:.0f}% of the CPU; waiting for a quiet machine to run it again")
        waited = probes.wait_quiet(args.max_other_load, args.quiet_timeout)
        args.waited_s += waited
        log(f"{label}: waited {waited:.0f} s")


def _run_entry(system: str, c: int | None, specs, records, duration, cpu, rate=None, **extra) -> dict:
    summary = summarize(records, duration)
    log(
        f"{system} C={c} rate={rate} n={len(specs)}: {summary['output_throughput']:.1f} out tok/s, "
        f"TPOT {1e3 * summary['tpot_s']['mean']:.0f} ms, TTFT {1e3 * summary['ttft_s']['mean']:.0f} ms, "
        f"{duration:.1f} s, other load {cpu.get('other_pct', float('nan')):.0f}%"
    )
    return {
        "system": system,
        "concurrency": c,
        "rate": rate,
        "num_requests": len(specs),
        "summary": summary,
        "records": [r.to_json() for r in records],
        "cpu": cpu,
        **extra,
    }


def sluice_runs(args: argparse.Namespace, specs: list[RequestSpec], plan: dict[int, int]) -> tuple[list, dict]:
    """Every Sluice run (closed loop per concurrency, then Poisson), and the profile if asked."""
    server, pids = None, {}
    if all(f"sluice:{c}" in args.skip for c in args.concurrency) and not args.rates and not args.profile:
        return [], {}
    if args.url is None:
        sys.path.insert(0, str(ROOT))
        from tests.e2e.server import LauncherProcess

        server = LauncherProcess(ROOT / args.model_dir, "--dtype", args.dtype, *args.launcher_args.split())
        log("starting sluice-launcher")
        server.start(timeout_s=600)
        pids = probes.server_processes(server.process.pid)
    url = args.url or server.url
    runs, profile = [], {}
    try:
        asyncio.run(warm_up(url, args.api, specs[0]))
        loads = [(c, None, specs[: plan[c]]) for c in args.concurrency if f"sluice:{c}" not in args.skip]
        loads += [(None, rate, specs) for rate in args.rates]
        for c, rate, subset in loads:

            def one(c=c, rate=rate, subset=subset):
                before = probes.scrape(url)
                records, duration = asyncio.run(run_load(url, subset, args.api, c, rate or float("inf"), args.seed))
                return before, probes.scrape(url), records, duration

            (before, after, records, duration), cpu = measure(args, f"sluice C={c}", one, pids)
            steps = probes.step_breakdown(before, after, duration, cpu["server_cpu_s"].get("router"))
            runs.append(_run_entry("sluice", c, subset, records, duration, cpu, rate, server_steps=steps))
        if args.profile and pids:
            profile = profile_run(args, url, pids, specs[: args.profile_requests])
    finally:
        if server is not None:
            server.stop()
    return runs, profile


def profile_run(args: argparse.Namespace, url: str, pids: dict[str, int], specs: list[RequestSpec]) -> dict:
    """One extra run at `--profile` concurrency under py-spy (shard 0 and router); not in the table."""
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


def baseline_runs(args: argparse.Namespace, specs: list[RequestSpec], plan: dict[int, int]) -> tuple[list, list]:
    """Every baseline run, and notes on what was skipped or derived."""
    runs, notes = [], [f"skipped: {cell}" for cell in args.skip]
    wanted = {b: [c for c in args.concurrency if f"{b}:{c}" not in args.skip] for b in args.baselines}
    if wanted.get("pipeline"):
        limit = args.pipeline_max_requests or args.num_requests
        levels = [c for c in wanted["pipeline"] if plan[c] <= limit]
        for c in sorted(set(wanted["pipeline"]) - set(levels)):
            notes.append(f"pipeline C={c}: not run ({plan[c]} requests > --pipeline-max-requests {limit})")
        if levels:
            n = max(plan[c] for c in levels)
            log(f"pipeline: serving {n} requests one at a time")
            traces, cpu = measure(
                args, "pipeline", lambda: baselines.pipeline_traces(args.model_dir, specs[:n], args.device)
            )
            for c in levels:
                records, duration = baselines.sequential_server(traces[: plan[c]], c)
                runs.append(_run_entry("pipeline", c, specs[: plan[c]], records, duration, cpu))
            notes.append(f"pipeline: {n} requests served one at a time, replayed as a sequential server at C={levels}")
    if wanted.get("static") or wanted.get("continuous"):
        import torch

        model, tok = baselines.load_model(args.model_dir, args.device, getattr(torch, args.dtype))
        for c in wanted.get("static", []):
            (records, duration), cpu = measure(
                args, f"static C={c}", lambda c=c: baselines.static_batches(model, tok, specs[: plan[c]], c)
            )
            runs.append(_run_entry("static", c, specs[: plan[c]], records, duration, cpu))
        for c in wanted.get("continuous", []):
            (records, duration), cpu = measure(
                args,
                f"continuous C={c}",
                lambda c=c: baselines.continuous_batching(model, specs[: plan[c]], c, args.cb_max_batch_tokens),
            )
            runs.append(_run_entry("continuous", c, specs[: plan[c]], records, duration, cpu))
    return runs, notes


def machine() -> dict:
    def sh(cmd: str) -> str:
        return subprocess.run(cmd, shell=True, capture_output=True, text=True, cwd=ROOT).stdout.strip()

    import torch
    import transformers

    return {
        "date": dt.datetime.now().isoformat(timespec="seconds"),
        "git_commit": sh("git rev-parse --short HEAD"),
        "git_dirty": bool(sh("git status --porcelain --untracked-files=no")),
        "lscpu": sh("lscpu | head -20").splitlines(),
        "memory": sh("free -g | sed -n 2p"),
        "gpu": sh("nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null"),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": sys.version.split()[0],
        "command": " ".join(sys.argv),
    }


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    specs, plan = workload(args), requests_plan(args)
    log(f"waiting for a quiet machine (< {args.max_other_load:.0f}% CPU busy)")
    log(f"waited {probes.wait_quiet(args.max_other_load, args.quiet_timeout):.0f} s")
    started, args.waited_s = time.perf_counter(), 0.0
    log(f"workload {args.workload}: {len(specs)} requests; requests per concurrency {plan}")
    runs, profile = sluice_runs(args, specs, plan)
    more, notes = baseline_runs(args, specs, plan)
    runs += more
    notes += [
        f"WARNING: other processes used {r['cpu']['other_pct']:.0f}% of the CPU during {r['system']} "
        f"C={r['concurrency']}: its figures are not reliable"
        for r in runs
        if r["cpu"].get("other_pct", 0) > 10
    ]
    result = {
        "meta": machine() | {"elapsed_s": time.perf_counter() - started, "waited_s": args.waited_s},
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "requests_per_concurrency": plan,
        "notes": notes,
        "runs": runs,
        "ratios": report.ratios(runs),
        "profile": profile,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    text = json.dumps(result, indent=1, default=str)
    (args.out / "results.json").write_text(text)
    (args.out / f"results-{args.workload}-{time.strftime('%Y%m%d-%H%M%S')}.json").write_text(text)
    report.plot_throughput(runs, args.out / "throughput.png")
    report.plot_cdfs(runs, args.out / "latency_cdf.png")
    print(report.summary_text(result))


if __name__ == "__main__":
    main()
