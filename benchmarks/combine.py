"""One table figure per server, dtype and load, from the runs measured for it (every run stays in results.json).

A server runs each smaller concurrency twice (schedule.py). The figure the tables, ratios and
plots use is the median of those runs by output throughput: with an odd number of runs, the run
whose throughput is the median; with an even number, the mean of the two middle runs' figures
(so with two runs, the mean of both: throughput, TTFT, TPOT, ITL and E2E statistics averaged
field by field, request and token counts summed over the runs). A figure made of several runs
says so (`combined`) and lists each run's output throughput in run order (`run_tok_s`).
"""

from __future__ import annotations

COUNTS = ("completed", "failed", "input_tokens", "output_tokens")


def _key(run: dict) -> tuple:
    return run["system"], run.get("dtype"), run["concurrency"], run["num_requests"], run.get("rate"), run.get("phase")


def _tok_s(run: dict) -> float:
    return run["summary"]["output_throughput"]


def mean_summary(summaries: list[dict]) -> dict:
    """Field-by-field mean of run summaries (nested statistics too); counts are summed."""
    out = {}
    for k, v in summaries[0].items():
        if isinstance(v, dict):
            out[k] = {kk: sum(s[k][kk] for s in summaries) / len(summaries) for kk in v}
        elif k in COUNTS:
            out[k] = sum(s[k] for s in summaries)
        else:
            out[k] = sum(s[k] for s in summaries) / len(summaries)
    return out


def representative(group: list[dict]) -> dict:
    """The figure for runs of the same server, dtype and load (in run order); one run is its own figure."""
    if len(group) == 1:
        return group[0]
    ranked = sorted(group, key=_tok_s)
    mid = len(ranked) // 2
    about = {"run_tok_s": [_tok_s(r) for r in group], "round": None}
    if len(ranked) % 2:
        return ranked[mid] | about | {"combined": f"median of {len(group)} runs"}
    middle = ranked[mid - 1 : mid + 1]
    worst_cpu = max((r.get("cpu", {}) for r in middle), key=lambda cpu: cpu.get("other_pct", 0.0))
    return (
        group[0]
        | about
        | {
            "combined": f"mean of {len(middle)} runs" + (f" (the middle of {len(group)})" if len(group) > 2 else ""),
            "summary": mean_summary([r["summary"] for r in middle]),
            "records": [x for r in middle for x in r["records"]],
            "cpu": worst_cpu,
            "runs": len(middle),
        }
    )


def table_figures(runs: list[dict]) -> list[dict]:
    """One figure per (system, dtype, concurrency, requests, rate, phase), in order of first appearance."""
    groups: dict[tuple, list[dict]] = {}
    for run in runs:
        groups.setdefault(_key(run), []).append(run)
    return [representative(g) for g in groups.values()]
