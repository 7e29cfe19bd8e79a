"""Pairing servers by dtype, the peer, baseline and cold-start ratios, the interleaved run order, how
repeated runs make one figure, the drift note and the tables: the logic behind `make bench`'s
Sluice-against-vLLM figures, on hand-made run entries."""

import math

import pytest

from benchmarks import combine, drift, pairing, ratios, report
from benchmarks.options import parse_args, requests_plan
from benchmarks.schedule import Slot, interleave, run_name


def entry(system, dtype, c, tok_s, tpot, ttft, phase=None, n=None, attempts=1, round_=None, other=1.0):
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
        "records": [{"index": i} for i in range(n or 2 * c)],
        "cpu": {"other_pct": other, "attempts": attempts},
        "round": round_,
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
    same = {"auto": "bfloat16", "float32": "float32", "bfloat16": "bfloat16"}  # an AVX-512 BF16 CPU: bfloat16 is auto
    assert [r["name"] for r in pairing.pairings(["auto", "float32", "bfloat16"], {"sluice": same, "vllm": same})] == [
        "default",
        "float32",
    ]
    avx2 = {"sluice": {"auto": "float32", "float32": "float32", "bfloat16": "bfloat16"}, "vllm": same}
    assert [r["name"] for r in pairing.pairings(["auto", "float32", "bfloat16"], avx2)] == [
        "default",
        "float32",
        "bfloat16",
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


def slots(schedule: list[Slot]) -> list[tuple]:
    return [(x.system[0].upper(), x.concurrency, x.phase or x.round) for x in schedule]


def test_servers_take_turns_abab_at_the_largest_concurrency_then_abba_at_each_smaller_one():
    both = interleave({"sluice": [1, 8, 32], "vllm": [32, 8, 1]})
    assert slots(both) == [
        ("S", 32, "first"),
        ("V", 32, "first"),
        ("S", 32, "repeat"),
        ("V", 32, "repeat"),
        ("S", 8, 1),
        ("V", 8, 1),
        ("V", 8, 2),
        ("S", 8, 2),
        ("S", 1, 1),
        ("V", 1, 1),
        ("V", 1, 2),
        ("S", 1, 2),
    ]
    assert all(x.round == (1 if x.phase == "first" else 2) for x in both if x.phase)


def test_a_lone_server_or_skipped_levels_still_run_each_load_twice():
    assert slots(interleave({"sluice": [4]})) == [("S", 4, "first"), ("S", 4, "repeat")]
    alone = [("S", 8, "first"), ("S", 8, "repeat"), ("S", 1, 1), ("S", 1, 2)]
    assert slots(interleave({"sluice": [1, 8], "vllm": []})) == alone
    skipped = interleave({"sluice": [1, 8, 32], "vllm": [1, 8]})  # vllm's largest is 8: its cold start is there
    cold_at_8 = [
        ("S", 32, "first"),
        ("S", 32, "repeat"),
        ("S", 8, 1),
        ("V", 8, "first"),
        ("S", 8, 2),
        ("V", 8, "repeat"),
    ]
    assert slots(skipped)[:6] == cold_at_8
    assert interleave({}) == []
    assert (run_name(32, "first"), run_name(8, None, 2), run_name(1)) == ("C=32 (first)", "C=8 (run 2)", "C=1")


def test_two_runs_of_a_load_make_one_figure_their_mean_and_three_their_median():
    a = entry("sluice", "float32", 8, 300.0, 0.030, 0.8, round_=1, other=2.0)
    b = entry("sluice", "float32", 8, 280.0, 0.034, 1.0, round_=2)
    (mean,) = combine.table_figures([a, b])
    assert mean["summary"]["output_throughput"] == pytest.approx(290.0)  # not the better of the two (300)
    assert mean["summary"]["tpot_s"]["mean"] == pytest.approx(0.032)
    assert mean["summary"]["ttft_s"]["p99"] == pytest.approx(0.9)
    assert (mean["summary"]["completed"], mean["runs"], len(mean["records"])) == (32, 2, 32)
    assert mean["run_tok_s"] == [300.0, 280.0] and mean["combined"] == "mean of 2 runs"
    assert mean["cpu"]["other_pct"] == 2.0 and mean["round"] is None  # the worse run's contention
    assert a["summary"]["output_throughput"] == 300.0  # the runs themselves are left as they were
    c = entry("sluice", "float32", 8, 250.0, 0.040, 1.2, round_=3)
    (median,) = combine.table_figures([a, b, c])
    assert median["summary"] is b["summary"] and median["combined"] == "median of 3 runs"
    lone = entry("vllm", "float32", 8, 260.0, 0.035, 0.9)
    assert combine.table_figures([a, lone, b])[1] is lone


def test_ratios_and_tables_use_the_mean_of_each_servers_two_runs():
    paired = [
        entry("sluice", "float32", 8, 300.0, 0.030, 0.8, round_=1),
        entry("vllm", "bfloat16", 8, 200.0, 0.040, 0.5, round_=1),
        entry("vllm", "bfloat16", 8, 240.0, 0.036, 0.7, round_=2),
        entry("sluice", "float32", 8, 280.0, 0.034, 1.0, round_=2),
    ]
    (row,) = ratios.peer_ratios(paired, PAIRS, "vllm")
    assert (row["sluice_tok_s"], row["peer_tok_s"]) == (290.0, 220.0)
    assert row["throughput"] == pytest.approx(290 / 220) and row["ttft"] == pytest.approx(0.6 / 0.9)
    text = report.table(paired)
    assert "| 8 | sluice float32 | 32/32 in 2 runs | 290.0 (300.0 / 280.0) |" in text
    assert text.count("| 8 | vllm bfloat16 |") == 1
    caption = report.runs_caption(paired, 32)
    assert "sluice, vllm, vllm, sluice" in caption and "mean of 2 runs" in caption
    assert report.runs_caption(RUNS, 32) == "Runs (servers at C=32: the repeat run, see cold start):"


def test_the_drift_note_gives_bandwidth_before_and_after_and_the_idle_servers_cpu():
    check = drift.check("default", 38.2, 41.0)
    assert check["change_pct"] == pytest.approx(100 * (41.0 / 38.2 - 1))
    assert drift.note(check).startswith("default pairing: memory bandwidth 38.2 -> 41.0 GB/s (+7%)")
    run = entry("sluice", "float32", 8, 300.0, 0.03, 0.8) | {"pairing": "auto"}
    run["cpu"] |= {"resident_pct": 1.4, "settle_s": 2.6}
    lines = report.drift_lines({"drift": [check], "runs": [run, RUNS[0]]})
    assert lines == [drift.note(check, 1.4, 2.6)]
    assert lines[0].endswith(
        "used at most 1.4% of the CPU during the other's runs, after 3 s in all waiting for it to go idle before them"
    )
    text = report.summary_text(
        {
            "meta": {"date": "d", "git_commit": "c", "git_dirty": False, "elapsed_s": 1.0},
            "args": {"num_requests": 64, "workload": "random"},
            "requests_per_concurrency": {8: 16, 32: 64},
            "drift": [check],
            "runs": RUNS,
            "ratios": [],
        }
    )
    assert "Machine drift (memory bandwidth: torch sum over 256 MiB, best of 3):\ndefault pairing: memory" in text


def test_memory_bandwidth_is_measured_quickly():
    gbs = drift.memory_bandwidth_gbs(mib=8, repeats=2)
    assert 0.1 < gbs < 10_000


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


# Issue 16: Sluice with `--quantize int8` beside unquantized Sluice in the default pairing (bfloat16 here).
QUANT_RUNS = [
    entry("sluice", "bfloat16", 32, 700.0, 0.040, 1.0, phase="first"),
    entry("sluice", "bfloat16", 32, 730.0, 0.040, 1.0, phase="repeat"),
    entry("sluice", "bfloat16", 1, 66.0, 0.0150, 0.1, n=4, round_=1),
    entry("sluice", "bfloat16", 1, 74.0, 0.0130, 0.1, n=4, round_=2),
    entry("sluice-int8", "bfloat16", 32, 900.0, 0.030, 1.0, phase="first"),
    entry("sluice-int8", "bfloat16", 32, 1000.0, 0.030, 0.9, phase="repeat"),
    entry("sluice-int8", "bfloat16", 1, 120.0, 0.0080, 0.1, n=4, round_=1),
    entry("sluice-int8", "bfloat16", 1, 110.0, 0.0090, 0.1, n=4, round_=2),
    entry("vllm", "bfloat16", 32, 550.0, 0.050, 1.0, phase="repeat"),
    entry("vllm", "bfloat16", 1, 55.0, 0.018, 0.1, n=4),
    entry("sluice", "float32", 32, 400.0, 0.070, 1.5, phase="repeat"),
]
QUANT_PAIRS = pairing.pairings(
    ["auto", "float32"],
    {
        "sluice": {"auto": "bfloat16", "float32": "float32"},
        "vllm": {"auto": "bfloat16"},
        "sluice-int8": {"auto": "bfloat16"},  # the first pairing only
    },
)
MIB = 2**20
QUANT_SERVERS = [
    {"system": "sluice", "request": "auto", "quantize": None, "weight_bytes": 256 * MIB, "serves": ["auto"]},
    {"system": "vllm", "request": "auto", "serves": ["auto"]},
    {"system": "sluice-int8", "request": "auto", "quantize": "int8", "weight_bytes": 144 * MIB, "serves": ["auto"]},
    {"system": "sluice", "request": "float32", "quantize": None, "weight_bytes": 512 * MIB, "serves": ["float32"]},
]


def test_quantization_compares_int8_with_unquantized_sluice_of_the_same_pairing_against_issue_16s_targets():
    (row,) = ratios.quantization(QUANT_RUNS, QUANT_PAIRS, QUANT_SERVERS)  # float32 has no sluice-int8
    ref, quant = row["unquantized"], row["quantized"]
    assert row["pairing"] == "default"
    assert (ref["label"], ref["quantize"], ref["weight_bytes"]) == ("sluice bfloat16", None, 256 * MIB)
    assert (quant["label"], quant["quantize"], quant["weight_bytes"]) == ("sluice-int8 bfloat16", "int8", 144 * MIB)
    assert ref["tpot_s"] == pytest.approx(0.014) and quant["tpot_s"] == pytest.approx(0.0085)  # mean of the 2 runs
    assert (ref["tok_s"], quant["tok_s"]) == (730.0, 1000.0)  # the repeats, as in the runs table
    assert row["weight_ratio"] == pytest.approx(144 / 256)
    assert row["tpot_ratio"] == pytest.approx(0.0085 / 0.014) and row["tpot_met"] is False  # 0.61 > 0.6
    assert row["throughput_ratio"] == pytest.approx(1000 / 730) and row["throughput_met"] is True
    assert (row["tpot_concurrency"], row["tpot_target"]) == (1, 0.6)
    assert (row["throughput_concurrency"], row["throughput_target"]) == (32, 1.3)


def test_quantization_marks_figures_it_lacks_not_measured():
    only_c1 = [r for r in QUANT_RUNS if r["concurrency"] == 1]
    old_router = [{k: v for k, v in s.items() if k not in ("quantize", "weight_bytes")} for s in QUANT_SERVERS]
    (row,) = ratios.quantization(only_c1, QUANT_PAIRS, old_router)
    assert row["throughput_met"] is None and math.isnan(row["throughput_ratio"]) and row["tpot_met"] is False
    assert row["quantized"]["weight_bytes"] is None and math.isnan(row["weight_ratio"])
    text = report.quantization_table([row])
    assert "| default | sluice-int8 bfloat16 | none | - | 8 | - |" in text
    assert "| n/a (target ≥ 1.30x: not measured) |" in text
    assert ratios.quantization(QUANT_RUNS, PAIRS, QUANT_SERVERS) == []  # no sluice-int8 in the pairing: no row


def test_the_quantization_table_gives_weights_figures_and_both_verdicts():
    text = report.quantization_table(ratios.quantization(QUANT_RUNS, QUANT_PAIRS, QUANT_SERVERS))
    assert text.splitlines() == [
        "| pairing | Sluice | quantize | weights MiB | TPOT ms at C=1 | out tok/s at C=32 |",
        "|---|---|---|---|---|---|",
        "| default | sluice bfloat16 | none | 256.0 | 14 | 730.0 |",
        "| default | sluice-int8 bfloat16 | int8 | 144.0 | 8 | 1000.0 |",
        "| default | int8 ÷ unquantized | | 0.56x | 0.61x (target ≤ 0.60x: missed) | 1.37x (target ≥ 1.30x: met) |",
    ]


def test_sluice_int8_is_no_competitor_in_the_peer_tables_and_gets_its_own_section():
    rows = ratios.competitor_ratios(QUANT_RUNS, QUANT_PAIRS, ["vllm", "sluice-int8"])
    assert rows == ratios.peer_ratios(QUANT_RUNS, QUANT_PAIRS, "vllm")  # vLLM's rows exactly as without int8
    assert {r["peer"] for r in rows} == {"vllm bfloat16"} and {r["sluice"] for r in rows} == {"sluice bfloat16"}
    assert ratios.baseline_ratios(QUANT_RUNS, ("pipeline", "static")) == []
    result = {
        "meta": {"date": "d", "git_commit": "c", "git_dirty": False, "elapsed_s": 1.0},
        "args": {"num_requests": 64, "workload": "random", "peers": ["vllm", "sluice-int8"]},
        "requests_per_concurrency": {1: 4, 32: 64},
        "runs": QUANT_RUNS,
        "ratios": [],
        "peer_ratios": rows,
        "quantization": ratios.quantization(QUANT_RUNS, QUANT_PAIRS, QUANT_SERVERS),
    }
    text = report.summary_text(result)
    peers = text[text.index("Sluice against its peers") : text.index("Quantization (issue 16)")]
    assert "sluice-int8" not in peers and "| default | 32 | 64 | sluice bfloat16 | vllm bfloat16 |" in peers
    assert "| default | int8 ÷ unquantized |" in text[text.index("Quantization (issue 16)") :]
    table = report.table(QUANT_RUNS)
    assert table.index("| 1 | sluice bfloat16 |") < table.index("| 1 | sluice-int8 bfloat16 |")
    assert table.index("| 1 | sluice-int8 bfloat16 |") < table.index("| 1 | vllm bfloat16 |")
    failed = result | {"quantization": []}
    assert "sluice-int8 was not measured (see the notes above)" in report.summary_text(failed)
    unasked = failed | {"args": result["args"] | {"peers": ["vllm"]}}
    assert "Quantization (issue 16)" not in report.summary_text(unasked)


def test_the_runs_caption_says_which_server_ran_in_the_first_pairing_only():
    runs = [
        entry(system, dtype, 8, 300.0, 0.03, 0.8, round_=r) | {"pairing": request}
        for request, systems in (("auto", ("sluice", "vllm", "sluice-int8")), ("float32", ("sluice", "vllm")))
        for r in (1, 2)
        for system in systems
        for dtype in ["bfloat16" if request == "auto" else "float32"]
    ]
    caption = report.runs_caption(runs, 32)
    assert "sluice, vllm, sluice-int8, sluice-int8, vllm, sluice (sluice-int8 in the default pairing only)" in caption
    assert "pairing only" not in report.runs_caption([r for r in runs if r["system"] != "sluice-int8"], 32)


def test_sluice_int8_is_a_peer_choice_and_listed_once():
    args = parse_args(["--peers", "vllm", "sluice-int8", "sluice-int8", "--dtypes", "auto", "float32"])
    assert args.peers == ["vllm", "sluice-int8"]
