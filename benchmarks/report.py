"""Turning runs into a table, ratios and plots (matplotlib, PNG)."""

from __future__ import annotations

import math
from pathlib import Path

from benchmarks.metrics import RequestRecord

SYSTEMS = ("sluice", "pipeline", "static", "continuous")
_COLORS = {"sluice": "tab:blue", "pipeline": "tab:gray", "static": "tab:orange", "continuous": "tab:green"}


def _ms(x: float) -> str:
    return "-" if x is None or math.isnan(x) else f"{1e3 * x:.0f}"


def table(runs: list[dict]) -> str:
    """A Markdown table: one row per (concurrency, system) closed-loop run."""
    head = (
        "| C | system | requests | out tok/s | req/s | TTFT mean / p50 / p90 / p99 (ms) "
        "| TPOT mean / p50 / p90 / p99 (ms) | ITL p50 / p99 (ms) | E2E mean / p50 / p90 / p99 (s) | other load |"
    )
    lines = [head, "|" + "---|" * 10]
    for run in sorted(runs, key=lambda r: (r.get("rate") is not None, r["concurrency"] or 0, _order(r["system"]))):
        s = run["summary"]
        ttft, tpot, itl, e2e = s["ttft_s"], s["tpot_s"], s["itl_s"], s["e2e_s"]
        load = run.get("cpu", {}).get("other_pct")
        label = run["concurrency"] if run.get("rate") is None else f"{run['concurrency'] or '∞'} @ {run['rate']}/s"
        lines.append(
            f"| {label} | {run['system']} | {s['completed']}/{s['completed'] + s['failed']} "
            f"| {s['output_throughput']:.1f} | {s['request_throughput']:.3f} "
            f"| {' / '.join(_ms(ttft[k]) for k in ('mean', 'p50', 'p90', 'p99'))} "
            f"| {' / '.join(_ms(tpot[k]) for k in ('mean', 'p50', 'p90', 'p99'))} "
            f"| {_ms(itl['p50'])} / {_ms(itl['p99'])} "
            f"| {' / '.join(f'{e2e[k]:.1f}' for k in ('mean', 'p50', 'p90', 'p99'))} "
            f"| {'-' if load is None else f'{load:.0f}%'} |"
        )
    return "\n".join(lines)


def _order(system: str) -> int:
    system = system.split()[0]
    return SYSTEMS.index(system) if system in SYSTEMS else len(SYSTEMS)


def ratios(runs: list[dict]) -> list[dict]:
    """Sluice against each baseline run on the same requests at the same concurrency.

    throughput: Sluice / baseline output tok/s (higher is better for Sluice); tpot, ttft:
    baseline / Sluice mean (higher is better for Sluice).

    Where the pipeline baseline was not run at some concurrency, a row "pipeline (est.)" uses its
    measured throughput and TPOT from the largest concurrency it ran at: a sequential server's
    throughput and per-token time do not depend on how many clients wait (its TTFT does: n/a).
    """
    closed = [r for r in runs if r.get("rate") is None]
    sluice = {(r["concurrency"], r["num_requests"]): r["summary"] for r in closed if r["system"] == "sluice"}
    out = _pipeline_estimates(closed)
    for r in closed:
        ref = sluice.get((r["concurrency"], r["num_requests"]))
        if r["system"] == "sluice" or ref is None:
            continue
        b = r["summary"]
        out.append(
            {
                "concurrency": r["concurrency"],
                "requests": r["num_requests"],
                "baseline": r["system"],
                "throughput": _div(ref["output_throughput"], b["output_throughput"]),
                "tpot": _div(b["tpot_s"]["mean"], ref["tpot_s"]["mean"]),
                "ttft": _div(b["ttft_s"]["mean"], ref["ttft_s"]["mean"]),
            }
        )
    return out


def _pipeline_estimates(closed: list[dict]) -> list[dict]:
    measured = sorted((r["concurrency"], r["summary"]) for r in closed if r["system"] == "pipeline")
    if not measured:
        return []
    done = {c for c, _ in measured}
    pipe = measured[-1][1]
    return [
        {
            "concurrency": r["concurrency"],
            "requests": r["num_requests"],
            "baseline": "pipeline (est.)",
            "throughput": _div(r["summary"]["output_throughput"], pipe["output_throughput"]),
            "tpot": _div(pipe["tpot_s"]["mean"], r["summary"]["tpot_s"]["mean"]),
            "ttft": math.nan,
        }
        for r in closed
        if r["system"] == "sluice" and r["concurrency"] not in done
    ]


def _div(a: float, b: float) -> float:
    return a / b if b and not math.isnan(b) else math.nan


def _x(ratio: float) -> str:
    return "n/a" if math.isnan(ratio) else f"{ratio:.2f}x"


def ratio_table(rows: list[dict]) -> str:
    lines = [
        "| C | requests | vs | throughput (Sluice ÷ it) | TPOT (it ÷ Sluice) | TTFT (it ÷ Sluice) |",
        "|---|---|---|---|---|---|",
    ]
    for r in sorted(rows, key=lambda r: (r["concurrency"], _order(r["baseline"]))):
        lines.append(
            f"| {r['concurrency']} | {r['requests']} | {r['baseline']} | {_x(r['throughput'])} "
            f"| {_x(r['tpot'])} | {_x(r['ttft'])} |"
        )
    return "\n".join(lines)


def overhead_table(runs: list[dict]) -> str:
    """Per Sluice run: where a step's time goes, from /metrics and the router's CPU time (see probes.py)."""
    lines = [
        "| C | steps | step period ms | shard forward ms (prefill / decode) | shard busy % | not-forward % "
        "| router CPU ms/step (% of wall) | decode: send-to-receive ms, apply ms, formula % |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for run in runs:
        steps = run.get("server_steps", {})
        a, d, p = steps.get("all"), steps.get("decode"), steps.get("prefill")
        if not a:
            continue
        label = run["concurrency"] or f"rate {run['rate']}/s"
        fwd = f"{p['forward_ms'] if p else math.nan:.0f} / {d['forward_ms'] if d else math.nan:.1f}"
        dec = f"{d['round_trip_ms']:.1f}, {d['apply_ms']:.2f}, {d['metric_overhead_pct']:.0f}%" if d else "-"
        lines.append(
            f"| {label} | {a['steps']:.0f} | {a['period_ms']:.1f} | {fwd} | {a['shard_busy_pct']:.1f}% "
            f"| {a['not_forward_pct']:.1f}% | {a['router_cpu_ms']:.2f} ({a['router_cpu_pct']:.1f}%) | {dec} |"
        )
    return "\n".join(lines)


def plot_throughput(runs: list[dict], path: Path) -> None:
    """Output tok/s and mean TPOT against concurrency, one line per system."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    closed = [r for r in runs if r.get("rate") is None]
    for system in SYSTEMS:
        pts = sorted((r["concurrency"], r["summary"]) for r in closed if r["system"] == system)
        if not pts:
            continue
        cs = [c for c, _ in pts]
        kw = {"marker": "o", "label": system, "color": _COLORS[system]}
        ax1.plot(cs, [s["output_throughput"] for _, s in pts], **kw)
        ax2.plot(cs, [1e3 * s["tpot_s"]["mean"] for _, s in pts], **kw)
    for ax, ylabel in ((ax1, "output tokens/s"), (ax2, "mean TPOT (ms)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrency (closed-loop clients)")
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
        ax.legend()
    ax1.set_title("Throughput vs concurrency")
    ax2.set_title("Time per output token vs concurrency")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_cdfs(runs: list[dict], path: Path) -> None:
    """CDFs of TTFT, TPOT and end-to-end latency, one column per concurrency, one line per system."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    closed = [r for r in runs if r.get("rate") is None]
    levels = sorted({r["concurrency"] for r in closed})
    metrics = (
        ("TTFT (s)", lambda x: x.ttft),
        ("TPOT (ms)", lambda x: 1e3 * (x.tpot or 0)),
        ("E2E (s)", lambda x: x.e2e),
    )
    fig, axes = plt.subplots(len(metrics), len(levels), figsize=(4 * len(levels), 3 * len(metrics)), squeeze=False)
    for col, c in enumerate(levels):
        for r in (r for r in closed if r["concurrency"] == c):
            recs = [RequestRecord(**x) for x in r["records"]]
            recs = [x for x in recs if x.ok]
            for row, (_, fn) in enumerate(metrics):
                xs = sorted(fn(x) for x in recs)
                xs, ys = xs[:1] + xs, [i / len(xs) for i in range(len(xs) + 1)]
                axes[row][col].step(xs, ys, where="post", label=r["system"], color=_COLORS.get(r["system"]))
        for row, (name, _) in enumerate(metrics):
            ax = axes[row][col]
            ax.set_xlabel(name)
            ax.set_ylabel("fraction of requests")
            ax.set_title(f"C={c}: {name.split()[0]}")
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def profile_text(profile: dict) -> str:
    """Top self-time functions of the profiled processes."""
    if not profile:
        return ""
    lines = [f"py-spy, C={profile['concurrency']}, {profile['num_requests']} requests (separate run, not in the table)"]
    for name in ("shard", "router"):
        top = profile.get(name)
        if not top:
            continue
        threads = ", ".join(f"{t} {s:.1f} s" for t, s in top["threads"].items())
        lines.append(f"\n{name}: {top['seconds']:.1f} s sampled, non-idle ({threads})")
        lines.append("  top 10 by self time, % of the sampled time:")
        lines += [f"  {pct:5.1f}%  {fn}" for fn, pct in top["self"]]
        lines.append("  top 10 Sluice functions by total (inclusive) time:")
        lines += [f"  {pct:5.1f}%  {fn}" for fn, pct in top["total"]]
    return "\n".join(lines)


def summary_text(result: dict) -> str:
    """Everything `run.py` prints at the end."""
    meta, plan, runs = result["meta"], result["requests_per_concurrency"], result["runs"]
    full = result["args"]["num_requests"]
    subsets = [f"C={c}: first {n} of {full}" for c, n in plan.items() if n < full]
    parts = [
        f"Sluice benchmark, {meta['date']}, commit {meta['git_commit']}{' (dirty tree)' if meta['git_dirty'] else ''}",
        f"workload {result['args']['workload']}, {full} requests; {'; '.join(subsets) or 'all requests at every C'}"
        + (" (subsets for the time budget; every system runs the same subset)" if subsets else ""),
        *result.get("notes", []),
        "",
        table(runs),
        "",
        ratio_table(result["ratios"]),
        "",
        "Sluice step time (/metrics and OS CPU time): not-forward % = share of the run's wall time the shard "
        "was not in a forward (sampling, gRPC, router bubbles, client gaps); router CPU = the router process's "
        "CPU time per step (hidden behind the forward when steps overlap); formula % = (send-to-receive - "
        "forward + apply) / (send-to-receive + apply), which with overlapped steps counts the wait behind the "
        "previous step and is not router time.",
        overhead_table([r for r in runs if r["system"] == "sluice"]),
        "",
        profile_text(result.get("profile") or {}),
        f"\nelapsed {meta['elapsed_s']:.0f} s, of which {meta.get('waited_s', 0):.0f} s waiting for other jobs to stop",
    ]
    return "\n".join(parts)
