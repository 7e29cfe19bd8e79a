"""Benchmark entry point: Sluice and its peers (vLLM), each started fresh per dtype, and the
`transformers` baselines, on one workload in one command.

    python -m benchmarks.run --peers vllm --dtypes auto float32 --concurrency 1 8 32   # see `make bench`

Every system at concurrency C runs the same first n(C) requests of the workload (n(C) = the
workload's size unless `--requests-at C=n` lowers it for time), so every compared figure comes
from the same prompts and lengths. Servers: per `--dtypes` entry (a pairing, see pairing.py:
`auto` is each server's default, and a start whose dtype another entry asks for serves both),
Sluice and each peer start one after the other and stay resident while their loads run
interleaved, A B A B at the largest concurrency and A B B A at the others, against the machine's
drift (pair_runs.py, schedule.py); the memory bandwidth before and after each pairing's runs
shows how much the machine drifted (drift.py); the first pairing then probes each server with a
long prompt (long_prompt.py) and, with `--constrained`, Sluice with JSON-schema constrained
requests (constrained.py). `--peers sluice-int8` adds Sluice started with `--quantize int8` to
the first pairing's load runs only, for issue 16's table of int8 against unquantized Sluice
(ratios.quantization). The baselines run once at `--dtype`, after the servers. Writes
`benchmarks/out/results.json` (every run, plus a timestamped copy), prints the tables (report.py;
a server's repeated runs of a load make one figure, combine.py) and saves `throughput.png` and
`latency_cdf.png` next to it (charts.py). Every server started is stopped, also on errors, Ctrl-C
and SIGTERM.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

from benchmarks import baselines, charts, pairing, probes, ratios, report, vllm_venv
from benchmarks.baseline_runs import baseline_runs
from benchmarks.measure import Phases, log
from benchmarks.options import parse_args, requests_plan
from benchmarks.pair_runs import pairing_runs
from benchmarks.pair_servers import Collected
from benchmarks.schedule import run_name
from benchmarks.workload import RequestSpec, make_requests, nano_vllm_requests

ROOT = Path(__file__).resolve().parent.parent


def workload(args: argparse.Namespace) -> list[RequestSpec]:
    if args.workload == "nano-vllm":
        return nano_vllm_requests(args.model_dir, args.num_requests, args.seed)
    return make_requests(args.model_dir, args.num_requests, tuple(args.prompt_len), tuple(args.output_len), args.seed)


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
        "vllm": vllm_venv.VLLM,
    }


def _exit_on_sigterm(signum, frame) -> None:
    raise SystemExit(128 + signum)  # unwinds through every `finally`, which stops the servers


def contention_notes(
    runs: list[dict], probes_: list[dict], limit: float, constrained_: dict | None = None
) -> list[str]:
    """A warning per run (or probe) during which other processes used more than `limit` % of the CPU."""
    items = [
        (f"{ratios.label(r)} {run_name(r['concurrency'], r.get('phase'), r.get('round'))}", r["cpu"]) for r in runs
    ]
    items += [(f"{p['system']} {p['dtype']} long prompt", p["cpu"]) for p in probes_]
    c = constrained_ or {}
    items += [
        (f"{c['system']} {c['dtype']} {r['mode']} C={c['concurrency']} (run {r['round']})", r["cpu"])
        for r in c.get("runs", [])
    ]
    return [
        f"WARNING: other processes used {cpu['other_pct']:.0f}% of the CPU during {name}: its figures are not reliable"
        for name, cpu in items
        if cpu.get("other_pct", 0) > limit
    ]


def constrained_notes(probe: dict) -> list[str]:
    """A warning when the constrained probe's outputs did not all follow the schema."""
    if not probe.get("bad_outputs"):
        return []
    return [
        f"WARNING: {probe['bad_outputs']} of {probe['outputs_checked']} constrained outputs were not prefixes of "
        "documents valid under the schema or stopped short of their tokens: the constraint was not applied as "
        "asked and the constrained figure does not stand (examples in results.json, constrained.runs[].bad)"
    ]


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv, __doc__)
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    specs, plan, phases = workload(args), requests_plan(args), Phases()
    if "vllm" in args.peers and args.vllm_url is None:
        phases.timed("vllm venv", vllm_venv.ensure, args.vllm_venv, log=log)
    log(f"waiting for a quiet machine (< {args.max_other_load:.0f}% CPU busy)")
    log(f"waited {probes.wait_quiet(args.max_other_load, args.quiet_timeout):.0f} s")
    started, args.waited_s = time.perf_counter(), 0.0
    log(f"workload {args.workload}: {len(specs)} requests; requests per concurrency {plan}; dtypes {args.dtypes}")
    out, order = Collected(), pairing.start_order(args.dtypes)
    for request in order:
        pairing_runs(args, request, request == order[0], specs, plan, phases, out)
    runs, errors = list(out.runs), out.errors
    more, baseline_notes = baseline_runs(args, specs, plan, phases)
    runs += more
    notes = errors + out.notes + baseline_notes + constrained_notes(out.constrained)
    notes += contention_notes(runs, out.long_prompt, 10, out.constrained)
    pairs = pairing.pairings(args.dtypes, {system: done for system, done in out.resolved.items() if done})
    result = {
        "meta": machine()
        | {"elapsed_s": time.perf_counter() - started, "waited_s": args.waited_s, "phases": phases.rows},
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "requests_per_concurrency": plan,
        "notes": notes,
        "servers": out.servers,
        "pairings": pairs,
        "drift": out.drift,
        "runs": runs,
        "table_figures": [{k: v for k, v in r.items() if k != "records"} for r in ratios.compared_runs(runs)],
        "ratios": ratios.baseline_ratios(runs, baselines.BASELINES),
        "peer_ratios": ratios.competitor_ratios(runs, pairs, args.peers),
        "quantization": ratios.quantization(runs, pairs, out.servers),
        "cold_start": ratios.cold_starts(runs),
        "long_prompt": out.long_prompt,
        "constrained": out.constrained,
        "profile": out.profile,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    text = json.dumps(result, indent=1, default=str)
    (args.out / "results.json").write_text(text)
    (args.out / f"results-{args.workload}-{time.strftime('%Y%m%d-%H%M%S')}.json").write_text(text)
    charts.plot_throughput(runs, args.out / "throughput.png")
    charts.plot_cdfs(runs, args.out / "latency_cdf.png")
    print(report.summary_text(result))
    if errors:
        raise SystemExit(f"{len(errors)} server error(s); see the notes above and {args.out}")


if __name__ == "__main__":
    main()
