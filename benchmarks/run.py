"""Benchmark entry point: Sluice and its peers (vLLM), each started fresh per dtype, and the
`transformers` baselines, on one workload in one command.

    python -m benchmarks.run --peers vllm --dtypes auto float32 --concurrency 1 8 32   # see `make bench`

Every system at concurrency C runs the same first n(C) requests of the workload (n(C) = the
workload's size unless `--requests-at C=n` lowers it for time), so every compared figure comes
from the same prompts and lengths. Servers: for each system, a fresh start per `--dtypes` entry
(see pairing.py: `auto` is each server's default, and a start whose dtype another entry asks for
serves both), measured as server_runs.py says; the baselines run once at `--dtype`. Writes
`benchmarks/out/results.json` (plus a timestamped copy), prints the tables (report.py) and saves
`throughput.png` and `latency_cdf.png` next to it (charts.py). Every server started is stopped,
also on errors, Ctrl-C and SIGTERM.
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
from benchmarks.options import parse_args, probe_config, requests_plan
from benchmarks.server_runs import levels, server_runs
from benchmarks.servers import SluiceServer, VllmServer
from benchmarks.workload import RequestSpec, make_requests, nano_vllm_requests

ROOT = Path(__file__).resolve().parent.parent


def workload(args: argparse.Namespace) -> list[RequestSpec]:
    if args.workload == "nano-vllm":
        return nano_vllm_requests(args.model_dir, args.num_requests, args.seed)
    return make_requests(args.model_dir, args.num_requests, tuple(args.prompt_len), tuple(args.output_len), args.seed)


def make_server(args: argparse.Namespace, system: str, request: str):
    """A not yet started server of `system` for the dtype `request` (attached where a URL was given)."""
    if system == "sluice":
        return SluiceServer(ROOT / args.model_dir, request, args.launcher_args.split(), args.out, args.url)
    return VllmServer(args.vllm_venv, ROOT / args.model_dir, request, args.vllm_args.split(), args.out, args.vllm_url)


def system_runs(args, system: str, specs, plan, phases: Phases) -> dict:
    """Every start of `system` the dtype requests need, each measured and stopped.

    Returns {"resolved": {request: dtype used}, "servers": [...], "runs": [...], "long_prompt": [...],
    "profile": {...}, "notes": [...], "errors": [...]}; a start that failed is an error, not an exception.
    """
    out = {"resolved": {}, "servers": [], "runs": [], "long_prompt": [], "profile": {}, "notes": [], "errors": []}
    order = pairing.start_order(args.dtypes)
    probe = probe_config(args)
    attached = (args.url if system == "sluice" else args.vllm_url) is not None
    if not levels(args, system) and not args.rates and probe is None and not (system == "sluice" and args.profile):
        return out
    for request in order:
        earlier = pairing.covered_by(request, out["resolved"])
        if earlier is not None:
            out["resolved"][request] = out["resolved"][earlier]
            next(s for s in out["servers"] if s["request"] == earlier)["serves"].append(request)
            out["notes"].append(
                f"{system} --dtype {request}: the `{earlier}` start already ran {out['resolved'][earlier]}; "
                "its runs stand for both"
            )
            continue
        if attached and out["servers"]:
            out["notes"].append(f"{system} --dtype {request}: not run (attached to one running server)")
            continue
        server = make_server(args, system, request)
        try:
            log(f"{system}: attaching to {server.url}" if attached else f"{system}: starting with --dtype {request}")
            phases.timed(f"{system} {request} start", server.start, args.startup_timeout)
            log(f"{system} --dtype {request}: uses {server.dtype}, healthy after {server.startup_s or 0:.0f} s")
            done = phases.timed(
                f"{system} {request} runs",
                server_runs,
                args,
                server,
                specs,
                plan,
                probe if request == order[0] else None,
                profile=bool(args.profile) and request == order[0],
            )
        except Exception as e:  # one server's failure leaves the others' figures; main exits non-zero
            log(f"{system} --dtype {request} failed: {e}")
            out["errors"].append(f"ERROR: {system} --dtype {request}: {type(e).__name__}: {str(e)[-2000:]}")
            continue
        finally:
            phases.timed(f"{system} {request} stop", server.stop)
        out["resolved"][request] = server.dtype
        out["servers"].append(server.describe() | {"serves": [request]})
        out["runs"] += done["runs"]
        out["long_prompt"] += [done["long_prompt"]] if done["long_prompt"] else []
        out["profile"] = out["profile"] or done["profile"]
    return out


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


def contention_notes(runs: list[dict], probes_: list[dict], limit: float) -> list[str]:
    """A warning per run (or probe) during which other processes used more than `limit` % of the CPU."""
    items = [
        (f"{ratios.label(r)} C={r['concurrency']}" + (f" ({r['phase']})" if r.get("phase") else ""), r["cpu"])
        for r in runs
    ]
    items += [(f"{p['system']} {p['dtype']} long prompt", p["cpu"]) for p in probes_]
    return [
        f"WARNING: other processes used {cpu['other_pct']:.0f}% of the CPU during {name}: its figures are not reliable"
        for name, cpu in items
        if cpu.get("other_pct", 0) > limit
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
    runs, servers, long_prompts, notes, errors, resolved, profile = [], [], [], [], [], {}, {}
    for system in ("sluice", *args.peers):
        done = system_runs(args, system, specs, plan, phases)
        runs += done["runs"]
        servers += done["servers"]
        long_prompts += done["long_prompt"]
        notes += done["notes"]
        errors += done["errors"]
        profile = profile or done["profile"]
        if done["resolved"]:
            resolved[system] = done["resolved"]
    more, baseline_notes = baseline_runs(args, specs, plan, phases)
    runs += more
    notes = errors + notes + baseline_notes + contention_notes(runs, long_prompts, 10)
    pairs = pairing.pairings(args.dtypes, resolved)
    result = {
        "meta": machine()
        | {"elapsed_s": time.perf_counter() - started, "waited_s": args.waited_s, "phases": phases.rows},
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "requests_per_concurrency": plan,
        "notes": notes,
        "servers": servers,
        "pairings": pairs,
        "runs": runs,
        "ratios": ratios.baseline_ratios(runs, baselines.BASELINES),
        "peer_ratios": [row for peer in args.peers for row in ratios.peer_ratios(runs, pairs, peer)],
        "cold_start": ratios.cold_starts(runs),
        "long_prompt": long_prompts,
        "profile": profile,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    text = json.dumps(result, indent=1, default=str)
    (args.out / "results.json").write_text(text)
    (args.out / f"results-{args.workload}-{time.strftime('%Y%m%d-%H%M%S')}.json").write_text(text)
    charts.plot_throughput(runs, args.out / "throughput.png")
    charts.plot_cdfs(runs, args.out / "latency_cdf.png")
    print(report.summary_text(result))
    if errors:
        raise SystemExit(f"{len(errors)} server start(s) failed; see the notes above and {args.out}")


if __name__ == "__main__":
    main()
