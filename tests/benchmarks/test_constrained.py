"""The constrained-decoding probe (benchmarks/constrained.py): the output check, the run order, the ratio and its
table, the flags, and where `make bench` runs it; on hand-made records and fake servers."""

import math

import pytest

from benchmarks import constrained, loadgen, report
from benchmarks.constrained import CONSTRAINED, UNCONSTRAINED, bad_outputs, order, summarize_runs, valid_prefix
from benchmarks.metrics import RequestRecord
from benchmarks.options import constrained_requests, parse_args, requests_plan
from benchmarks.workload import RequestSpec
from tests.benchmarks.test_orchestration import fake, run_all  # noqa: F401 (the fixture)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "{",
        ' \n{ "te',
        '{"text"',
        '{"text": ',
        '{"text":"',
        '{"text": "Hello, world',
        '{"text": "a\\u00',
        '{"text": "tab\\tquote\\" é',
        '{"text": "ends in a backslash\\',
    ],
)
def test_prefixes_of_valid_documents_pass(text):
    assert valid_prefix(text)


@pytest.mark.parametrize(
    "text",
    [
        "Hello",  # unconstrained text
        '{"other": "x',  # a property the schema does not have
        '{"text": 5',  # not a string
        '{"text": "short"}',  # closed before minLength
        '{"text": "raw\nnewline',  # a control character inside a string
        '{"text": "bad escape \\x',
        '["text"',
    ],
)
def test_anything_else_fails(text):
    assert not valid_prefix(text)


def test_a_document_long_enough_may_close():
    body = "a" * constrained.MIN_LENGTH
    assert valid_prefix('{"text": "' + body + '" }') and valid_prefix('{"text": "' + body + '"')
    assert not valid_prefix('{"text": "' + body[1:] + '"}')


def test_bad_outputs_are_invalid_text_or_missing_tokens():
    specs = [RequestSpec(i, (1, 2), " a b", 8) for i in range(3)]
    records = [
        RequestRecord(0, 2, 0.0, [0.1] * 8, 8, text='{"text": "fine'),
        RequestRecord(1, 2, 0.0, [0.1] * 8, 8, text="not json"),
        RequestRecord(2, 2, 0.0, [0.1] * 5, 5, text='{"text": "short'),
    ]
    assert [(b["index"], b["problem"]) for b in bad_outputs(records, specs)] == [
        (1, "not a prefix of a valid document"),
        (2, "5 tokens of 8"),
    ]


def test_the_loads_take_turns_so_that_a_linear_drift_cancels():
    u, c = UNCONSTRAINED, CONSTRAINED
    assert order(2) == [(u, 1), (c, 1), (c, 2), (u, 2)]
    assert order(3)[4:] == [(u, 3), (c, 3)]
    assert order(0) == []


def run(mode, tok_s, period_ms, bad=0, completed=64):
    summary = {"output_throughput": tok_s, "completed": completed}
    return {"mode": mode, "summary": summary, "server_steps": {"all": {"period_ms": period_ms}}, "bad_count": bad}


def probe_entry(runs):
    head = {"system": "sluice", "dtype": "bfloat16", "concurrency": 32, "num_requests": 64, "output_tokens": 8192}
    return head | summarize_runs(runs) | {"runs": runs}


def test_the_ratio_is_the_mean_constrained_over_the_mean_unconstrained_throughput():
    runs = [
        run(UNCONSTRAINED, 700.0, 40.0),
        run(CONSTRAINED, 600.0, 48.0),
        run(CONSTRAINED, 620.0, 46.0),
        run(UNCONSTRAINED, 740.0, 38.0),
    ]
    s = summarize_runs(runs)
    assert s[UNCONSTRAINED]["tok_s"] == 720.0 and s[UNCONSTRAINED]["run_tok_s"] == [700.0, 740.0]
    assert s[CONSTRAINED]["tok_s"] == 610.0 and s[CONSTRAINED]["period_ms"] == 47.0
    assert s["ratio"] == pytest.approx(610 / 720) and s["ratio"] < constrained.TARGET and not s["meets_target"]
    assert (s["outputs_checked"], s["bad_outputs"]) == (128, 0)
    fast = summarize_runs([run(UNCONSTRAINED, 700.0, 40.0), run(CONSTRAINED, 650.0, 42.0)])
    assert fast["ratio"] == pytest.approx(650 / 700) and fast["meets_target"]
    invalid = summarize_runs([run(UNCONSTRAINED, 700.0, 40.0), run(CONSTRAINED, 690.0, 40.0, bad=3)])
    assert invalid["bad_outputs"] == 3 and not invalid["meets_target"]  # fast because it did not constrain
    assert math.isnan(summarize_runs([run(CONSTRAINED, 690.0, 40.0)])["ratio"])


def test_the_table_shows_each_runs_throughput_the_ratio_and_the_verdict():
    runs = [
        run(UNCONSTRAINED, 700.0, 40.0),
        run(CONSTRAINED, 600.0, 48.0),
        run(CONSTRAINED, 620.0, 46.0, bad=2),
        run(UNCONSTRAINED, 740.0, 38.0),
    ]
    text = report.constrained_table(probe_entry(runs))
    assert (
        "| sluice bfloat16 | 32 | 64 x 128 | 720.0 (700.0 / 740.0) | 610.0 (600.0 / 620.0) | 0.85x | 39.0 / 47.0 "
        "| 126/128 | missed (bad outputs) |"
    ) in text
    assert "target: ≥ 0.85" in text
    assert report.constrained_table({}) == ""
    result = {
        "meta": {"date": "d", "git_commit": "c", "git_dirty": False, "elapsed_s": 1.0},
        "args": {"num_requests": 64, "workload": "random"},
        "requests_per_concurrency": {32: 64},
        "runs": [],
        "ratios": [],
        "constrained": probe_entry(runs),
    }
    summary = report.summary_text(result)
    assert "Constrained decoding: the same requests" in summary and "unconstrained, constrained, constrained" in summary
    assert "Constrained decoding" not in report.summary_text(result | {"constrained": {}})


def test_a_kept_text_is_the_streamed_texts_joined():
    record = RequestRecord(0, 2, 0.0, text="")
    for event in ({"choices": [{"text": '{"te'}]}, {"choices": [{"delta": {"content": 'xt": "'}}]}, {"choices": []}):
        loadgen._apply_event("openai", event, record, 0.1)
    assert record.text == '{"text": "' and len(record.token_s) == 2
    assert "text" not in RequestRecord(0, 2, 0.0).to_json()  # the loads' records stay as they were


def test_the_probe_is_off_unless_asked_and_runs_the_load_of_its_concurrency():
    assert parse_args([]).constrained == 0
    args = parse_args(["--constrained", "2", "--requests-at", "8=16"])
    assert constrained_requests(args, requests_plan(args)) == 64  # C=32 runs every request
    args = parse_args(["--constrained", "2", "--constrained-concurrency", "8", "--requests-at", "8=16"])
    assert constrained_requests(args, requests_plan(args)) == 16
    args = parse_args(["--constrained", "2", "--constrained-requests", "32", "--constrained-tokens", "64"])
    assert constrained_requests(args, requests_plan(args)) == 32
    specs = [RequestSpec(i, (1,), " a", 128) for i in range(64)]
    chosen = constrained.probe_specs(specs, 32, 64)
    assert len(chosen) == 32 and {s.max_tokens for s in chosen} == {64} and chosen[5].prompt_ids == (1,)


def test_make_bench_probes_the_first_pairings_sluice_between_the_long_prompt_and_the_profile(fake, monkeypatch):  # noqa: F811
    from benchmarks import pair_runs

    calls = []

    def constrained_run(args, server, specs, c, runs, resident):
        fake.log.append(("constrained", server.system, server.request))
        calls.append((len(specs), c, runs, resident))
        return {"system": server.system, "runs": []}

    monkeypatch.setattr(pair_runs, "constrained_run", constrained_run)
    out = run_all(["--peers", "vllm", "--dtypes", "auto", "float32", "--profile", "32", "--constrained", "2"])
    probes = [e for e in fake.log if e[0] in ("probe", "constrained", "profile")]
    assert [e[:2] for e in probes] == [
        ("probe", "sluice"),
        ("probe", "vllm"),
        ("constrained", "sluice"),
        ("profile", {"vllm:vllm:serve": 21}),
    ]
    assert ("constrained", "sluice", "auto") in fake.log
    assert calls == [(0, 32, 2, {"vllm:vllm:serve": 21})]  # the fake workload is empty; vLLM stays resident
    assert out.constrained == {"system": "sluice", "runs": []}
