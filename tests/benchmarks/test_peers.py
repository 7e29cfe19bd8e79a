"""Pairing servers by dtype, the peer, baseline and cold-start ratios, the run order and the tables:
the logic behind `make bench`'s Sluice-against-vLLM figures, on hand-made run entries."""

import math

import pytest

from benchmarks import pairing, ratios, report
from benchmarks.options import parse_args, requests_plan
from benchmarks.server_runs import load_sequence


def entry(system, dtype, c, tok_s, tpot, ttft, phase=None, n=None, attempts=1):
    """A run entry as run.py writes it (the fields the ratios and tables read)."""
    stats = lambda x: {"mean": x, "p50": x, "p90": x, "p99": x}  # noqa: E731
    summary = {
        "completed": n or 2 * c,
        "failed": 0,
        "output_throughput": tok_s,
        "request_throughput": tok_s / 128,
        "ttft_s": stats(ttft),
        "tpot_s": stats(tpot),
        "itl_s": stats(tpot),
        "e2e_s": stats(ttft + 127 * tpot),
    }
    return {
        "system": system,
        "dtype": dtype,
        "concurrency": c,
        "phase": phase,
        "rate": None,
        "num_requests": n or 2 * c,
        "summary": summary,
        "records": [],
        "cpu": {"other_pct": 1.0, "attempts": attempts},
    }


def test_auto_starts_first_and_an_explicit_dtype_reuses_what_auto_resolved_to():
    assert pairing.start_order(["float32", "auto", "float32"]) == ["auto", "float32"]
    assert pairing.start_order(["bfloat16", "float32"]) == ["bfloat16", "float32"]
    assert pairing.covered_by("float32", {"auto": "float32"}) == "auto"  # Sluice today: one start serves both
    assert pairing.covered_by("float32", {"auto": "bfloat16"}) is None  # vLLM: a second start
    assert pairing.covered_by("auto", {"float32": "float32"}) is None  # unknown until started
    assert pairing.covered_by("auto", {"auto": "bfloat16"}) == "auto"


def test_pairings_name_each_request_and_the_dtype_each_system_used():
    rows = pairing.pairings(
        ["auto", "float32"],
        {"sluice": {"auto": "bfloat16", "float32": "float32"}, "vllm": {"auto": "bfloat16", "float32": "float32"}},
    )
    assert rows == [
        {"request": "auto", "name": "default", "dtypes": {"sluice": "bfloat16", "vllm": "bfloat16"}},
        {"request": "float32", "name": "float32", "dtypes": {"sluice": "float32", "vllm": "float32"}},
    ]
    missing = pairing.pairings(["auto"], {"sluice": {"auto": "float32"}})
    assert missing[0]["dtypes"] == {"sluice": "float32"}


RUNS = [
    entry("sluice", "float32", 32, 100.0, 0.080, 3.0, phase="first"),
    entry("sluice", "float32", 32, 125.0, 0.064, 2.0, phase="repeat"),
    entry("sluice", "float32", 1, 40.0, 0.025, 0.2),
    entry("vllm", "bfloat16", 32, 250.0, 0.032, 1.0, phase="first"),
    entry("vllm", "bfloat16", 32, 250.0, 0.032, 1.0, phase="repeat"),
    entry("vllm", "bfloat16", 1, 50.0, 0.020, 0.1),
    entry("vllm", "float32", 32, 200.0, 0.040, 1.5, phase="first", attempts=2),
    entry("vllm", "float32", 32, 160.0, 0.050, 1.5, phase="repeat"),
    entry("static", "float32", 32, 50.0, 0.160, 12.0),
    entry("pipeline", "float32", 1, 20.0, 0.050, 0.4),
]
PAIRS = pairing.pairings(
    ["auto", "float32"],
    {"sluice": {"auto": "float32", "float32": "float32"}, "vllm": {"auto": "bfloat16", "float32": "float32"}},
)


def test_peer_ratios_compare_the_repeat_runs_per_pairing_and_concurrency():
    rows = ratios.peer_ratios(RUNS, PAIRS, "vllm")
    got = {(r["pairing"], r["concurrency"]): r for r in rows}
    assert list(got) == [("default", 1), ("default", 32), ("float32", 32)]  # no vllm float32 at C=1
    d32 = got["default", 32]
    assert (d32["sluice"], d32["peer"]) == ("sluice float32", "vllm bfloat16")
    assert d32["throughput"] == pytest.approx(125 / 250)  # Sluice ÷ vLLM, from the repeat (not 100)
    assert d32["tpot"] == pytest.approx(0.032 / 0.064)  # vLLM ÷ Sluice
    assert d32["ttft"] == pytest.approx(1.0 / 2.0)
    assert got["float32", 32]["throughput"] == pytest.approx(125 / 160)
    assert got["default", 1]["tpot"] == pytest.approx(0.020 / 0.025)


def test_cold_start_is_first_over_repeat_and_flags_a_rerun_first():
    rows = {r["label"]: r for r in ratios.cold_starts(RUNS)}
    assert rows["sluice float32"]["ratio"] == pytest.approx(0.8)
    assert rows["vllm bfloat16"]["ratio"] == pytest.approx(1.0)
    assert rows["vllm float32"]["ratio"] == pytest.approx(1.25) and rows["vllm float32"]["rerun"]
    assert not rows["sluice float32"]["rerun"]


def test_baseline_ratios_use_the_repeat_and_estimate_pipeline_where_it_did_not_run():
    rows = {(r["concurrency"], r["baseline"]): r for r in ratios.baseline_ratios(RUNS, ("pipeline", "static"))}
    assert set(rows) == {(32, "static float32"), (1, "pipeline float32"), (32, "pipeline float32 (est.)")}
    assert rows[32, "static float32"]["throughput"] == pytest.approx(125 / 50)
    assert rows[32, "static float32"]["ttft"] == pytest.approx(12.0 / 2.0)
    assert rows[1, "pipeline float32"]["tpot"] == pytest.approx(0.050 / 0.025)
    est = rows[32, "pipeline float32 (est.)"]
    assert est["throughput"] == pytest.approx(125 / 20) and math.isnan(est["ttft"])


def test_division_by_nothing_is_nan():
    assert math.isnan(ratios.div(1.0, 0.0)) and math.isnan(ratios.div(1.0, math.nan))


def test_a_server_runs_its_largest_concurrency_twice_then_the_others_downwards():
    assert load_sequence([1, 8, 32]) == [(32, "first"), (32, "repeat"), (8, None), (1, None)]
    assert load_sequence([4]) == [(4, "first"), (4, "repeat")]
    assert load_sequence([]) == []


def test_tables_show_every_system_and_dtype_once_per_concurrency():
    text = report.table(RUNS)
    assert text.count("| 32 | sluice float32 |") == 1  # the repeat only
    assert "| 32 | vllm bfloat16 |" in text and "| 32 | vllm float32 |" in text
    peers = report.peer_table(ratios.peer_ratios(RUNS, PAIRS, "vllm"))
    assert "| default | 32 | 64 | sluice float32 | vllm bfloat16 | 125.0 | 250.0 | 0.50x | 64 / 32 | 0.50x |" in peers
    cold = report.cold_start_table(ratios.cold_starts(RUNS))
    assert "| vllm float32 | 32 | 200.0 | 160.0 | 1.25x (first run was rerun after contention: not cold) |" in cold


def test_flags_default_to_the_old_behaviour_and_take_peers_and_dtypes():
    old = parse_args(["--dtype", "bfloat16"])
    assert (old.peers, old.dtypes, old.dtype) == ([], ["bfloat16"], "bfloat16")
    new = parse_args(["--peers", "vllm", "--dtypes", "auto", "float32", "--requests-at", "1=4", "8=16"])
    assert (new.peers, new.dtypes) == (["vllm"], ["auto", "float32"])
    assert requests_plan(new) == {1: 4, 8: 16, 32: 64}
    assert parse_args(["--peers"]).peers == []
