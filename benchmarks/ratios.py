"""The comparisons a benchmark reports, from its run entries (see `run.py` for an entry's keys).

A run entry names its `system` ("sluice", a peer such as "vllm", or a `transformers` baseline),
the `dtype` the system used, its `concurrency` (None for an open-loop run at `rate`) and, for a
server's largest concurrency, its `phase`: "first" (the first measured run after the warm-up
request) or "repeat" (the same load again). The tables and every ratio use the repeat; the first
run is only compared with it ("cold start"). A server runs its other concurrencies twice
(schedule.py, `round` 1 and 2); the tables and ratios use one figure per server and load, the
mean of the two (combine.py).

Every ratio against a peer or baseline is arranged so that above 1 is better for Sluice: throughput
is Sluice ÷ the other, latencies (TPOT, TTFT) are the other ÷ Sluice. "sluice-int8" (Sluice with
`--quantize int8`) is no peer: it is compared only with unquantized Sluice of the same pairing
(`quantization`), as issue 16 states its targets: int8 ÷ unquantized, for TPOT and throughput alike.
"""

from __future__ import annotations

import math

from benchmarks.combine import table_figures

SLUICE = "sluice"
SLUICE_INT8 = "sluice-int8"  # Sluice with `--quantize int8` (servers.SluiceInt8Server)
VARIANTS = (SLUICE_INT8,)  # Sluice started otherwise: no peer, never in the peer tables
FIRST, REPEAT = "first", "repeat"

# Issue 16, measured in the same run on this CPU: int8's decode TPOT at concurrency 1 at most 0.6x unquantized
# Sluice's, its output throughput at concurrency 32 at least 1.3x.
QUANT_TPOT_C, QUANT_TPOT_TARGET = 1, 0.6
QUANT_THROUGHPUT_C, QUANT_THROUGHPUT_TARGET = 32, 1.3


def label(run: dict) -> str:
    """A run's name in tables: system and dtype, e.g. "vllm bfloat16" (the system alone without a dtype)."""
    return f"{run['system']} {run['dtype']}" if run.get("dtype") else run["system"]


def div(a: float, b: float) -> float:
    """a / b, NaN where b is zero or NaN."""
    return a / b if b and not math.isnan(b) else math.nan


def compared_runs(runs: list[dict]) -> list[dict]:
    """The closed-loop figures that tables and ratios use: every run but the "first" ones, a server's
    runs of the same load combined into one figure (combine.py)."""
    return table_figures([r for r in runs if r.get("rate") is None and r.get("phase") != FIRST])


def _against(ref: dict, other: dict) -> dict:
    a, b = ref["summary"], other["summary"]
    return {
        "throughput": div(a["output_throughput"], b["output_throughput"]),
        "tpot": div(b["tpot_s"]["mean"], a["tpot_s"]["mean"]),
        "ttft": div(b["ttft_s"]["mean"], a["ttft_s"]["mean"]),
    }


def _key(run: dict) -> tuple[int, int]:
    return run["concurrency"], run["num_requests"]


def baseline_ratios(runs: list[dict], baselines: tuple[str, ...]) -> list[dict]:
    """Each Sluice run against each baseline run on the same requests at the same concurrency.

    Where the pipeline baseline was not run at some concurrency, a row "pipeline (est.)" uses its
    measured throughput and TPOT from the largest concurrency it ran at: a sequential server's
    throughput and per-token time do not depend on how many clients wait (its TTFT does: n/a).
    """
    closed = compared_runs(runs)
    sluice = [r for r in closed if r["system"] == SLUICE]
    others = [r for r in closed if r["system"] in baselines]
    out = []
    for ref in sluice:
        for other in (o for o in others if _key(o) == _key(ref)):
            row = {"concurrency": ref["concurrency"], "requests": ref["num_requests"]}
            out.append(row | {"sluice": label(ref), "baseline": label(other)} | _against(ref, other))
    pipe = sorted((r for r in others if r["system"] == "pipeline"), key=lambda r: r["concurrency"])
    if pipe:
        done = {r["concurrency"] for r in pipe}
        for ref in (r for r in sluice if r["concurrency"] not in done):
            est = _against(ref, pipe[-1]) | {"ttft": math.nan}
            row = {"concurrency": ref["concurrency"], "requests": ref["num_requests"], "sluice": label(ref)}
            out.append(row | {"baseline": f"{label(pipe[-1])} (est.)"} | est)
    return out


def peer_ratios(runs: list[dict], pairings: list[dict], peer: str) -> list[dict]:
    """Sluice against `peer` per pairing (see pairing.py) and concurrency, on the same requests.

    Each row also carries both output throughputs and mean TPOTs, so the table reads alone.
    """
    closed = compared_runs(runs)
    out = []
    for pair in pairings:
        mine, theirs = pair["dtypes"].get(SLUICE), pair["dtypes"].get(peer)
        if mine is None or theirs is None:
            continue
        refs = {_key(r): r for r in closed if r["system"] == SLUICE and r["dtype"] == mine}
        for other in (r for r in closed if r["system"] == peer and r["dtype"] == theirs):
            ref = refs.get(_key(other))
            if ref is None:
                continue
            out.append(
                {
                    "pairing": pair["name"],
                    "concurrency": other["concurrency"],
                    "requests": other["num_requests"],
                    "sluice": label(ref),
                    "peer": label(other),
                    "sluice_tok_s": ref["summary"]["output_throughput"],
                    "peer_tok_s": other["summary"]["output_throughput"],
                    "sluice_tpot_s": ref["summary"]["tpot_s"]["mean"],
                    "peer_tpot_s": other["summary"]["tpot_s"]["mean"],
                }
                | _against(ref, other)
            )
    return sorted(out, key=lambda r: (r["pairing"] != "default", r["pairing"], r["concurrency"]))


def competitor_ratios(runs: list[dict], pairings: list[dict], peers: list[str]) -> list[dict]:
    """`peer_ratios` for each peer but Sluice's variants (VARIANTS), which are compared only with Sluice itself."""
    return [row for peer in peers if peer not in VARIANTS for row in peer_ratios(runs, pairings, peer)]


def cold_starts(runs: list[dict]) -> list[dict]:
    """Per server start: first ÷ repeat output throughput at the same concurrency (1.0: no warm-up cost).

    `rerun` is true where the first run was run again after contention: then it was not cold.
    """
    out = []
    for first in (r for r in runs if r.get("phase") == FIRST):
        same = (r for r in runs if r.get("phase") == REPEAT and label(r) == label(first) and _key(r) == _key(first))
        repeat = next(same, None)
        if repeat is None:
            continue
        a, b = first["summary"]["output_throughput"], repeat["summary"]["output_throughput"]
        out.append(
            {
                "label": label(first),
                "concurrency": first["concurrency"],
                "first_tok_s": a,
                "repeat_tok_s": b,
                "ratio": div(a, b),
                "rerun": first.get("cpu", {}).get("attempts", 1) > 1,
            }
        )
    return out


def _scheme(system: str, dtype: str, closed: list[dict], servers: list[dict], request: str) -> dict:
    """One Sluice scheme of a pairing: its weight bytes (its start's /info) and the two figures issue 16 names."""
    start = next((s for s in servers if s["system"] == system and request in s.get("serves", [])), {})
    mine = [r for r in closed if r["system"] == system and r["dtype"] == dtype]
    at = lambda c: next((r for r in mine if r["concurrency"] == c), None)  # noqa: E731
    tpot_run, tok_run = at(QUANT_TPOT_C), at(QUANT_THROUGHPUT_C)
    return {
        "label": f"{system} {dtype}",
        "quantize": start.get("quantize"),
        "weight_bytes": start.get("weight_bytes"),
        "tpot_s": tpot_run["summary"]["tpot_s"]["mean"] if tpot_run else None,
        "tok_s": tok_run["summary"]["output_throughput"] if tok_run else None,
        "tpot_requests": tpot_run["num_requests"] if tpot_run else None,
        "tok_s_requests": tok_run["num_requests"] if tok_run else None,
    }


def _ratio(a: float | None, b: float | None) -> float:
    """a / b, NaN where either is missing."""
    return math.nan if a is None or b is None else div(a, b)


def _verdict(ratio: float, target: float, at_most: bool) -> bool | None:
    """Whether `ratio` meets `target` (None: not measured)."""
    if ratio is None or math.isnan(ratio):
        return None
    return ratio <= target if at_most else ratio >= target


def quantization(runs: list[dict], pairings: list[dict], servers: list[dict], variant: str = SLUICE_INT8) -> list[dict]:
    """Per pairing with both unquantized Sluice and `variant`: each one's weight bytes (`servers`: the starts'
    describe(), with `serves`), mean TPOT at C=QUANT_TPOT_C and output tok/s at C=QUANT_THROUGHPUT_C (the figures
    of the runs table), and the ratios variant ÷ Sluice against issue 16's targets (`*_met`: None where a figure
    is missing)."""
    closed = compared_runs(runs)
    out = []
    for pair in pairings:
        mine, theirs = pair["dtypes"].get(SLUICE), pair["dtypes"].get(variant)
        if mine is None or theirs is None:
            continue
        ref = _scheme(SLUICE, mine, closed, servers, pair["request"])
        quant = _scheme(variant, theirs, closed, servers, pair["request"])
        tpot, tok_s, weights = (_ratio(quant[k], ref[k]) for k in ("tpot_s", "tok_s", "weight_bytes"))
        out.append(
            {
                "pairing": pair["name"],
                "unquantized": ref,
                "quantized": quant,
                "weight_ratio": weights,
                "tpot_concurrency": QUANT_TPOT_C,
                "tpot_ratio": tpot,
                "tpot_target": QUANT_TPOT_TARGET,
                "tpot_met": _verdict(tpot, QUANT_TPOT_TARGET, at_most=True),
                "throughput_concurrency": QUANT_THROUGHPUT_C,
                "throughput_ratio": tok_s,
                "throughput_target": QUANT_THROUGHPUT_TARGET,
                "throughput_met": _verdict(tok_s, QUANT_THROUGHPUT_TARGET, at_most=False),
            }
        )
    return out
