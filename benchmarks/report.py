"""The printed summary: Markdown tables ready for RESULTS.md (the machine's drift, runs, ratios, quantization,
cold start, long prompt, constrained decoding, server starts, Sluice's step time, the profile and the time each
phase took)."""

from __future__ import annotations

import math

from benchmarks import drift
from benchmarks.pairing import pairing_name
from benchmarks.ratios import (
    QUANT_THROUGHPUT_C,
    QUANT_THROUGHPUT_TARGET,
    QUANT_TPOT_C,
    QUANT_TPOT_TARGET,
    SLUICE_INT8,
    compared_runs,
    label,
)
from benchmarks.schedule import run_name

SYSTEMS = ("sluice", SLUICE_INT8, "vllm", "pipeline", "static", "continuous")
DTYPE_ORDER = ("bfloat16", "float16", "float32")


def _ms(x: float | None) -> str:
    return "-" if x is None or math.isnan(x) else f"{1e3 * x:.0f}"


def _x(ratio: float) -> str:
    return "n/a" if ratio is None or math.isnan(ratio) else f"{ratio:.2f}x"


def _order(system: str) -> int:
    system = system.split()[0]
    return SYSTEMS.index(system) if system in SYSTEMS else len(SYSTEMS)


def order_key(run: dict) -> tuple:
    """Table order: closed loop before Poisson, by concurrency, system, dtype."""
    dtype = run.get("dtype") or ""
    return (
        run.get("rate") is not None,
        run["concurrency"] or 0,
        _order(run["system"]),
        DTYPE_ORDER.index(dtype) if dtype in DTYPE_ORDER else len(DTYPE_ORDER),
    )


def table(runs: list[dict]) -> str:
    """A Markdown table: one row per (concurrency, system, dtype) figure (ratios.compared_runs: a server's "first"
    runs are left out, its repeated runs of a load make one figure, each run's tok/s in brackets)."""
    head = (
        "| C | system | requests | out tok/s | req/s | TTFT mean / p50 / p90 / p99 (ms) "
        "| TPOT mean / p50 / p90 / p99 (ms) | ITL p50 / p99 (ms) | E2E mean / p50 / p90 / p99 (s) | other load |"
    )
    lines = [head, "|" + "---|" * 10]
    shown = compared_runs(runs) + [r for r in runs if r.get("rate") is not None]
    for run in sorted(shown, key=order_key):
        s = run["summary"]
        ttft, tpot, itl, e2e = s["ttft_s"], s["tpot_s"], s["itl_s"], s["e2e_s"]
        load = run.get("cpu", {}).get("other_pct")
        c = run["concurrency"] if run.get("rate") is None else f"{run['concurrency'] or '∞'} @ {run['rate']}/s"
        requests = f"{s['completed']}/{s['completed'] + s['failed']}"
        requests += f" in {run['runs']} runs" if run.get("runs", 1) > 1 else ""
        tok_s = f"{s['output_throughput']:.1f}"
        tok_s += f" ({' / '.join(f'{x:.1f}' for x in run['run_tok_s'])})" if run.get("run_tok_s") else ""
        lines.append(
            f"| {c} | {label(run)} | {requests} "
            f"| {tok_s} | {s['request_throughput']:.3f} "
            f"| {' / '.join(_ms(ttft[k]) for k in ('mean', 'p50', 'p90', 'p99'))} "
            f"| {' / '.join(_ms(tpot[k]) for k in ('mean', 'p50', 'p90', 'p99'))} "
            f"| {_ms(itl['p50'])} / {_ms(itl['p99'])} "
            f"| {' / '.join(f'{e2e[k]:.1f}' for k in ('mean', 'p50', 'p90', 'p99'))} "
            f"| {'-' if load is None else f'{load:.0f}%'} |"
        )
    return "\n".join(lines)


def peer_table(rows: list[dict]) -> str:
    """Sluice against each peer, per pairing and concurrency (ratios.peer_ratios)."""
    lines = [
        "| pairing | C | requests | Sluice | peer | Sluice tok/s | peer tok/s | throughput (Sluice ÷ peer) "
        "| TPOT ms Sluice / peer | TPOT (peer ÷ Sluice) | TTFT (peer ÷ Sluice) |",
        "|" + "---|" * 11,
    ]
    for r in rows:
        lines.append(
            f"| {r['pairing']} | {r['concurrency']} | {r['requests']} | {r['sluice']} | {r['peer']} "
            f"| {r['sluice_tok_s']:.1f} | {r['peer_tok_s']:.1f} | {_x(r['throughput'])} "
            f"| {_ms(r['sluice_tpot_s'])} / {_ms(r['peer_tpot_s'])} | {_x(r['tpot'])} | {_x(r['ttft'])} |"
        )
    return "\n".join(lines)


def _mib(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**20:.1f}"


def _met(ratio: float, target: float, met: bool | None, sign: str) -> str:
    verdict = "not measured" if met is None else "met" if met else "missed"
    return f"{_x(ratio)} (target {sign} {target:.2f}x: {verdict})"


def quantization_table(rows: list[dict]) -> str:
    """Issue 16: unquantized Sluice and sluice-int8 of the same pairing, their weights and figures, and the ratios
    int8 ÷ unquantized against the issue's targets (ratios.quantization)."""
    lines = [
        f"| pairing | Sluice | quantize | weights MiB | TPOT ms at C={QUANT_TPOT_C} "
        f"| out tok/s at C={QUANT_THROUGHPUT_C} |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        for scheme in (r["unquantized"], r["quantized"]):
            tok_s = "-" if scheme["tok_s"] is None else f"{scheme['tok_s']:.1f}"
            lines.append(
                f"| {r['pairing']} | {scheme['label']} | {scheme['quantize'] or 'none'} "
                f"| {_mib(scheme['weight_bytes'])} | {_ms(scheme['tpot_s'])} | {tok_s} |"
            )
        name = f"{r['quantized']['quantize'] or r['quantized']['label'].split()[0]} ÷ unquantized"
        lines.append(
            f"| {r['pairing']} | {name} | | {_x(r['weight_ratio'])} "
            f"| {_met(r['tpot_ratio'], r['tpot_target'], r['tpot_met'], '≤')} "
            f"| {_met(r['throughput_ratio'], r['throughput_target'], r['throughput_met'], '≥')} |"
        )
    return "\n".join(lines)


def ratio_table(rows: list[dict]) -> str:
    """Sluice against the transformers baselines (ratios.baseline_ratios)."""
    lines = [
        "| C | requests | Sluice | vs | throughput (Sluice ÷ it) | TPOT (it ÷ Sluice) | TTFT (it ÷ Sluice) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in sorted(rows, key=lambda r: (r["concurrency"], r["sluice"], _order(r["baseline"]))):
        lines.append(
            f"| {r['concurrency']} | {r['requests']} | {r['sluice']} | {r['baseline']} | {_x(r['throughput'])} "
            f"| {_x(r['tpot'])} | {_x(r['ttft'])} |"
        )
    return "\n".join(lines)


def cold_start_table(rows: list[dict]) -> str:
    """Per server start: the first run at the largest concurrency against its repeat (ratios.cold_starts)."""
    lines = ["| server | C | first tok/s | repeat tok/s | first ÷ repeat |", "|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (_order(r["label"]), r["label"])):
        note = " (first run was rerun after contention: not cold)" if r["rerun"] else ""
        lines.append(
            f"| {r['label']} | {r['concurrency']} | {r['first_tok_s']:.1f} | {r['repeat_tok_s']:.1f} "
            f"| {_x(r['ratio'])}{note} |"
        )
    return "\n".join(lines)


def long_prompt_table(probes: list[dict]) -> str:
    """The long-prompt probe per server (long_prompt.py)."""
    lines = [
        "| server | median ITL ms | worst ITL ms (÷ median) | worst ITL during the arrival ms (÷ median) "
        "| long prompt TTFT ms | target: arrival worst ≤ 4x median |",
        "|---|---|---|---|---|---|",
    ]
    for p in sorted(probes, key=lambda p: _order(p["system"])):
        verdict = "met" if p["meets_target"] else "missed"
        if not p["covered"]:
            verdict += " (a stream ended inside the window)"
        lines.append(
            f"| {p['system']} {p['dtype']} | {_ms(p['median_itl_s'])} "
            f"| {_ms(p['worst_itl_s'])} ({_x(p['worst_over_median'])}) "
            f"| {_ms(p['worst_window_itl_s'])} ({_x(p['window_worst_over_median'])}) "
            f"| {_ms(p['long_ttft_s'])} | {verdict} |"
        )
    return "\n".join(lines)


def constrained_table(probe: dict) -> str:
    """The constrained-decoding probe (constrained.py): each mode's output tokens/s, their ratio, the step period."""
    if not probe:
        return ""
    u, c = probe["unconstrained"], probe["constrained"]
    runs = lambda m: " / ".join(f"{x:.1f}" for x in m["run_tok_s"])  # noqa: E731
    period = lambda x: "-" if x is None or math.isnan(x) else f"{x:.1f}"  # noqa: E731
    verdict = "met" if probe["meets_target"] else "missed"
    if probe["bad_outputs"]:
        verdict += " (bad outputs)"
    per_request = probe["output_tokens"] / probe["num_requests"] if probe["num_requests"] else math.nan
    return "\n".join(
        [
            "| server | C | requests x new tokens | unconstrained tok/s | constrained tok/s "
            "| constrained ÷ unconstrained | step period ms (unconstrained / constrained) "
            f"| constrained outputs valid | target: ≥ {probe['target']:.2f} |",
            "|" + "---|" * 9,
            f"| {probe['system']} {probe['dtype']} | {probe['concurrency']} | {probe['num_requests']} x "
            f"{per_request:.0f} | {u['tok_s']:.1f} ({runs(u)}) | {c['tok_s']:.1f} ({runs(c)}) | {_x(probe['ratio'])} "
            f"| {period(u['period_ms'])} / {period(c['period_ms'])} "
            f"| {probe['outputs_checked'] - probe['bad_outputs']}/{probe['outputs_checked']} | {verdict} |",
        ]
    )


def server_table(servers: list[dict]) -> str:
    """Each server start: the dtype asked for, passed, used (and where that was read), its startup time."""
    lines = [
        "| system | dtype request | passed | dtype used (read from) | startup s (launch to healthy) | pairings |",
        "|---|---|---|---|---|---|",
    ]
    for s in servers:
        startup = "attached" if s["attached"] else f"{s['startup_s']:.1f}"
        lines.append(
            f"| {s['system']} | {s['request']} | {s['passed'] or '-'} | {s['dtype']} ({s['dtype_source']}) "
            f"| {startup} | {', '.join(s['serves'])} |"
        )
    return "\n".join(lines)


def overhead_table(runs: list[dict]) -> str:
    """Per Sluice run: where a step's time goes, from /metrics and the router's CPU time (see probes.py)."""
    lines = [
        "| C | Sluice | steps | step period ms | shard forward ms (prefill / decode) | shard busy % | not-forward % "
        "| router CPU ms/step (% of wall) | decode: send-to-receive ms, apply ms, formula % |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for run in sorted(runs, key=order_key):
        steps = run.get("server_steps", {})
        a, d, p = steps.get("all"), steps.get("decode"), steps.get("prefill")
        if not a:
            continue
        c = run_name(run["concurrency"], run.get("phase"), run.get("round")).removeprefix("C=")
        c = c if run.get("rate") is None else f"rate {run['rate']}/s"
        fwd = f"{p['forward_ms'] if p else math.nan:.0f} / {d['forward_ms'] if d else math.nan:.1f}"
        dec = f"{d['round_trip_ms']:.1f}, {d['apply_ms']:.2f}, {d['metric_overhead_pct']:.0f}%" if d else "-"
        lines.append(
            f"| {c} | {run.get('dtype') or '-'} | {a['steps']:.0f} | {a['period_ms']:.1f} | {fwd} "
            f"| {a['shard_busy_pct']:.1f}% | {a['not_forward_pct']:.1f}% "
            f"| {a['router_cpu_ms']:.2f} ({a['router_cpu_pct']:.1f}%) | {dec} |"
        )
    return "\n".join(lines)


def phases_table(rows: list) -> str:
    """Wall time of each phase of the benchmark."""
    lines = ["| phase | s |", "|---|---|"]
    lines += [f"| {name} | {seconds:.1f} |" for name, seconds in rows]
    lines.append(f"| total | {sum(s for _, s in rows):.1f} |")
    return "\n".join(lines)


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


def drift_lines(result: dict) -> list[str]:
    """Per pairing: the memory bandwidth before and after its runs (drift.py), the most CPU the idle resident
    servers took during another server's run, and the time spent waiting for them to go idle first."""
    lines = []
    for entry in result.get("drift", []):
        cpus = [
            r["cpu"]
            for r in result.get("runs", [])
            if "resident_pct" in r.get("cpu", {}) and pairing_name(r.get("pairing") or "") == entry["pairing"]
        ]
        resident = max((c["resident_pct"] for c in cpus), default=None)
        lines.append(drift.note(entry, resident, sum(c.get("settle_s", 0.0) for c in cpus)))
    return lines


def _partial_systems(runs: list[dict], systems: list[str]) -> str:
    """Which interleaved servers ran in only some of the pairings (sluice-int8: the first one), e.g.
    " (sluice-int8 in the default pairing only)"; "" where each ran in all of them."""
    done = {s: {r.get("pairing") for r in runs if r["system"] == s and r.get("round")} for s in systems}
    every = set().union(*done.values())
    if len(every) < 2 or None in every:
        return ""
    partial = [
        f"{s} in the {', '.join(pairing_name(p) for p in sorted(done[s]))} pairing only"
        for s in systems
        if done[s] != every
    ]
    return f" ({'; '.join(partial)})" if partial else ""


def runs_caption(runs: list[dict], largest: int | None) -> str:
    """What the runs table's rows are: which run at the largest C, and how repeated runs were combined."""
    text = f"Runs (servers at C={largest}: the repeat run, see cold start"
    figures = [r for r in compared_runs(runs) if r.get("combined")]
    if figures:
        systems = list(dict.fromkeys(r["system"] for r in runs if r.get("round")))
        turns = (
            f"taking turns in the order {', '.join(systems + systems[::-1])}"
            if len(systems) > 1
            else "one run after the other"
        )
        turns += _partial_systems(runs, systems)
        text += (
            f"; at the other concurrencies each server ran twice, {turns}, and its row is the "
            + " or ".join(sorted({r["combined"] for r in figures}))
            + " (throughput and the TTFT, TPOT, ITL and E2E statistics averaged, requests counted over the runs), "
            "each run's out tok/s in brackets"
        )
    return text + "):"


def _section(title: str, body: str, empty: str = "") -> list[str]:
    return ["", title, body] if body.count("\n") > 1 else ([] if not empty else ["", title, empty])


def summary_text(result: dict) -> str:
    """Everything `run.py` prints at the end."""
    meta, plan, runs = result["meta"], result["requests_per_concurrency"], result["runs"]
    full = result["args"]["num_requests"]
    subsets = [f"C={c}: first {n} of {full}" for c, n in plan.items() if n < full]
    largest = max(plan, default=None)
    parts = [
        f"Sluice benchmark, {meta['date']}, commit {meta['git_commit']}{' (dirty tree)' if meta['git_dirty'] else ''}",
        f"workload {result['args']['workload']}, {full} requests; {'; '.join(subsets) or 'all requests at every C'}"
        + (" (subsets for the time budget; every system runs the same subset)" if subsets else ""),
        *result.get("notes", []),
    ]
    drifts = drift_lines(result)
    if drifts:
        parts += ["", "Machine drift (memory bandwidth: torch sum over 256 MiB, best of 3):", *drifts]
    parts += ["", runs_caption(runs, largest), table(runs)]
    parts += _section(
        "Sluice against its peers, per dtype pairing (both servers resident, their runs interleaved; the figures "
        "of the runs table):",
        peer_table(result.get("peer_ratios", [])),
    )
    parts += _section("Sluice against the transformers baselines:", ratio_table(result["ratios"]))
    asked = SLUICE_INT8 in (result["args"].get("peers") or [])
    parts += _section(
        f"Quantization (issue 16): unquantized Sluice and Sluice with `--quantize int8` (weight-only int8; "
        f"{SLUICE_INT8} in the tables), resident together in the first pairing, their runs interleaved; weights as "
        f"served (/info model_weight_bytes, over all shards); the figures of the runs table; targets int8 ÷ "
        f"unquantized: TPOT at C={QUANT_TPOT_C} ≤ {QUANT_TPOT_TARGET}x, throughput at C={QUANT_THROUGHPUT_C} "
        f"≥ {QUANT_THROUGHPUT_TARGET}x:",
        quantization_table(result.get("quantization", [])),
        f"{SLUICE_INT8} was not measured (see the notes above)" if asked else "",
    )
    parts += _section(
        f"Cold start: each server's first run at C={largest} right after one warm-up request, against the "
        "same load repeated:",
        cold_start_table(result.get("cold_start", [])),
    )
    probes = result.get("long_prompt", [])
    shape = probes[0]["config"] if probes else {}
    parts += _section(
        f"Long prompt ({shape.get('long_tokens')} tokens) arriving while {shape.get('streams')} streams decode "
        f"({shape.get('stream_tokens')} tokens each): their inter-token gaps over their whole life, and during the "
        f"arrival (the long request's send until its first token + {shape.get('after_s')} s):",
        long_prompt_table(probes),
    )
    probe = result.get("constrained") or {}
    parts += _section(
        f"Constrained decoding: the same requests unconstrained and with every one constrained to a JSON schema "
        f"(`response_format` json_schema; it cannot complete within the output, so both generate every token), "
        f"taking turns ({', '.join(r['mode'] for r in probe.get('runs', []))}; each run's tok/s in brackets):",
        constrained_table(probe),
    )
    parts += _section("Server starts:", server_table(result.get("servers", [])))
    sluice = [r for r in runs if r["system"] == "sluice"]
    parts += _section(
        "Sluice step time (/metrics and OS CPU time): not-forward % = share of the run's wall time the shard "
        "was not in a forward (sampling, gRPC, router bubbles, client gaps); router CPU = the router process's "
        "CPU time per step (hidden behind the forward when steps overlap); formula % = (send-to-receive - "
        "forward + apply) / (send-to-receive + apply), which with overlapped steps counts the wait behind the "
        "previous step and is not router time.",
        overhead_table(sluice),
    )
    parts += ["", profile_text(result.get("profile") or {})]
    parts += _section("Time per phase:", phases_table(meta.get("phases", [])))
    parts.append(
        f"\nelapsed {meta['elapsed_s']:.0f} s, of which {meta.get('waited_s', 0):.0f} s waiting for other jobs to stop"
    )
    return "\n".join(parts)
