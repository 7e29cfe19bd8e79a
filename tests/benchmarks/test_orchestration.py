"""pair_runs.pairing_runs with fake servers: the order of starts, interleaved runs, probes and stops per dtype
pairing, that every server is stopped whatever happens, and that one server's failure leaves the others' figures."""

import contextlib

import pytest

from benchmarks import drift, pair_runs, pair_servers, pairing, probes
from benchmarks.measure import Phases
from benchmarks.options import parse_args
from benchmarks.pair_servers import Collected

DEFAULTS = {"sluice": "float32", "vllm": "bfloat16", "sluice-int8": "float32"}  # what each resolves `auto` to here
PIDS = {"sluice": {"router": 11, "shard-0": 12}, "vllm": {"vllm:serve": 21}, "sluice-int8": {"router": 31}}


class FakeServer:
    def __init__(self, system, request, log, fail=False):
        self.system, self.request, self.log, self.fail = system, request, log, fail
        self.url, self.startup_s, self.pids, self.dtype = "http://fake", 1.0, {}, None

    def start(self, timeout_s):
        self.log.append(("start", self.system, self.request))
        if self.fail:
            raise RuntimeError("vllm serve exited with 1 before it was healthy")
        self.dtype = DEFAULTS[self.system] if self.request == "auto" else self.request
        self.pids = PIDS[self.system]

    def stop(self):
        self.log.append(("stop", self.system, self.request))

    def describe(self):
        return {"system": self.system, "request": self.request, "dtype": self.dtype}


class Fake:
    """The log of what happened, which (system, request) starts fail, and which (system, C, round) runs raise what."""

    def __init__(self):
        self.log, self.failing_starts, self.failing_runs, self.resident = [], set(), {}, {}


@pytest.fixture
def fake(monkeypatch):
    f = Fake()
    bandwidth = iter([38.2, 41.0, 40.0, 36.0])

    def make_server(args, system, request):
        return FakeServer(system, request, f.log, fail=(system, request) in f.failing_starts)

    def load_run(args, server, c, specs, rate=None, phase=None, resident=None, **tags):
        f.log.append(("run", server.system, server.dtype, c, phase, tags.get("round")))
        f.resident[server.system] = resident
        error = f.failing_runs.get((server.system, c, tags.get("round")))
        if error is not None:
            raise error
        return {"system": server.system, "dtype": server.dtype, "concurrency": c, "phase": phase, **tags}

    monkeypatch.setattr(pair_servers, "make_server", make_server)
    monkeypatch.setattr(pair_runs, "load_run", load_run)
    monkeypatch.setattr(pair_runs, "warm", lambda args, server, specs: f.log.append(("warm", server.system)))
    monkeypatch.setattr(drift, "memory_bandwidth_gbs", lambda: f.log.append(("bandwidth",)) or next(bandwidth))
    monkeypatch.setattr(probes, "settle", lambda pids: f.log.append(("settle", len(pids))) or 0.0)
    monkeypatch.setattr(
        pair_runs,
        "probe_run",
        lambda args, server, probe, resident: f.log.append(("probe", server.system)) or {"system": server.system},
    )
    monkeypatch.setattr(
        pair_runs,
        "profile_run",
        lambda args, url, pids, specs, resident: f.log.append(("profile", resident)) or {"concurrency": 32},
    )
    return f


def run_all(argv: list[str]) -> Collected:
    """Every pairing of `argv`'s --dtypes, as run.main runs them."""
    args, out = parse_args(argv), Collected()
    order = pairing.start_order(args.dtypes)
    for request in order:
        pair_runs.pairing_runs(args, request, request == order[0], [], {1: 4, 8: 16, 32: 64}, Phases(), out)
    return out


def runs(log: list, system: str | None = None) -> list:
    return [e[1:] for e in log if e[0] == "run" and (system is None or e[1] == system)]


def test_a_pairing_starts_one_server_after_the_other_then_runs_them_in_turn_abab_then_abba(fake):
    out = run_all(["--peers", "vllm", "--dtypes", "auto", "--profile", "32"])
    s, v = ("sluice", "float32"), ("vllm", "bfloat16")
    assert fake.log[:6] == [
        ("start", "sluice", "auto"),
        ("start", "vllm", "auto"),
        ("warm", "sluice"),
        ("warm", "vllm"),
        ("settle", 3),  # both servers idle before the bandwidth is measured
        ("bandwidth",),
    ]
    assert runs(fake.log) == [
        (*s, 32, "first", 1),
        (*v, 32, "first", 1),
        (*s, 32, "repeat", 2),
        (*v, 32, "repeat", 2),
        (*s, 8, None, 1),
        (*v, 8, None, 1),
        (*v, 8, None, 2),
        (*s, 8, None, 2),
        (*s, 1, None, 1),
        (*v, 1, None, 1),
        (*v, 1, None, 2),
        (*s, 1, None, 2),
    ]
    resident = {"vllm:vllm:serve": 21}
    assert fake.log[-7:] == [
        ("settle", 3),
        ("bandwidth",),
        ("probe", "sluice"),
        ("probe", "vllm"),
        ("profile", resident),
        ("stop", "vllm", "auto"),
        ("stop", "sluice", "auto"),
    ]
    assert fake.resident == {"sluice": resident, "vllm": {"sluice:router": 11, "sluice:shard-0": 12}}
    assert [r["order"] for r in out.runs] == list(range(1, 13)) and {r["pairing"] for r in out.runs} == {"auto"}
    assert out.drift == [drift.check("default", 38.2, 41.0)] and not out.errors
    assert out.resolved == {"sluice": {"auto": "float32"}, "vllm": {"auto": "bfloat16"}}


def test_a_start_that_serves_a_later_pairing_stands_for_it_and_the_other_server_runs_alone(fake):
    out = run_all(["--peers", "vllm", "--dtypes", "float32", "auto", "--profile", "32"])
    starts = [e for e in fake.log if e[0] in ("start", "stop")]
    assert starts == [
        ("start", "sluice", "auto"),
        ("start", "vllm", "auto"),
        ("stop", "vllm", "auto"),
        ("stop", "sluice", "auto"),
        ("start", "vllm", "float32"),
        ("stop", "vllm", "float32"),
    ]
    second = fake.log[fake.log.index(("start", "vllm", "float32")) :]
    assert runs(second) == [("vllm", "float32", c, p, r) for c, p, r in [(32, "first", 1), (32, "repeat", 2)]] + [
        ("vllm", "float32", c, None, r) for c in (8, 1) for r in (1, 2)
    ]
    assert ("probe", "vllm") not in second and fake.resident["vllm"] == {}  # probes: the first pairing only
    assert out.resolved["sluice"] == {"auto": "float32", "float32": "float32"}
    assert out.servers[0]["serves"] == ["auto", "float32"]
    assert any("not interleaved" in n for n in out.notes) and [d["pairing"] for d in out.drift] == [
        "default",
        "float32",
    ]


def test_a_failed_start_is_stopped_at_once_reported_and_the_rest_still_runs(fake):
    fake.failing_starts.add(("vllm", "auto"))
    out = run_all(["--peers", "vllm", "--dtypes", "auto", "float32"])
    assert fake.log.index(("stop", "vllm", "auto")) < fake.log.index(("warm", "sluice"))
    first = runs(fake.log[: fake.log.index(("stop", "sluice", "auto"))])
    assert {e[0] for e in first} == {"sluice"} and len(first) == 6  # Sluice alone: two runs per concurrency
    assert ("run", "vllm", "float32", 32, "first", 1) in fake.log
    assert out.resolved["vllm"] == {"float32": "float32"}
    assert len(out.errors) == 1 and "(start)" in out.errors[0] and "exited with 1" in out.errors[0]


def test_a_failed_run_stops_its_server_at_once_and_the_other_carries_on(fake):
    fake.failing_runs[("vllm", 8, 1)] = ConnectionError("server went away")
    out = run_all(["--peers", "vllm", "--dtypes", "auto"])
    after = fake.log[fake.log.index(("run", "vllm", "bfloat16", 8, None, 1)) :]
    assert after[1] == ("stop", "vllm", "auto")
    assert runs(after[2:]) == [("sluice", "float32", 8, None, 2), *(("sluice", "float32", 1, None, r) for r in (1, 2))]
    assert ("probe", "vllm") not in after and ("probe", "sluice") in after
    assert fake.log.count(("stop", "vllm", "auto")) == 1 and fake.log[-1] == ("stop", "sluice", "auto")
    assert len(out.errors) == 1 and "vllm --dtype auto (C=8 (run 1)): ConnectionError" in out.errors[0]
    assert [r["system"] for r in out.runs].count("vllm") == 2  # what vLLM measured before it failed stays


@pytest.mark.parametrize("interrupt", [KeyboardInterrupt(), SystemExit(143)])
def test_ctrl_c_or_sigterm_during_a_run_stops_every_server(fake, interrupt):
    fake.failing_runs[("vllm", 32, 1)] = interrupt
    with pytest.raises(type(interrupt)):
        run_all(["--peers", "vllm", "--dtypes", "auto", "float32"])
    assert fake.log[-2:] == [("stop", "vllm", "auto"), ("stop", "sluice", "auto")]


def test_a_stop_runs_once_even_when_asked_twice():
    log = []
    server = FakeServer("vllm", "auto", log)
    stop = pair_servers.Stop(server, "auto", Phases())
    with contextlib.ExitStack() as stack:
        stack.callback(stop)
        stop()
    assert log == [("stop", "vllm", "auto")]


def test_sluice_int8_runs_only_the_first_pairings_loads_interleaved_with_the_others(fake):
    out = run_all(["--peers", "vllm", "sluice-int8", "--dtypes", "auto", "float32", "--profile", "32"])
    starts = [e for e in fake.log if e[0] in ("start", "stop")]
    assert starts == [
        ("start", "sluice", "auto"),
        ("start", "vllm", "auto"),
        ("start", "sluice-int8", "auto"),
        ("stop", "sluice-int8", "auto"),
        ("stop", "vllm", "auto"),
        ("stop", "sluice", "auto"),
        ("start", "vllm", "float32"),  # Sluice's `auto` resolved to float32 here: its runs stand for both
        ("stop", "vllm", "float32"),
    ]
    first = fake.log[: fake.log.index(("stop", "sluice-int8", "auto"))]
    s, v, i = ("sluice", "float32"), ("vllm", "bfloat16"), ("sluice-int8", "float32")
    assert runs(first)[:6] == [
        (*s, 32, "first", 1),
        (*v, 32, "first", 1),
        (*i, 32, "first", 1),
        (*s, 32, "repeat", 2),
        (*v, 32, "repeat", 2),
        (*i, 32, "repeat", 2),
    ]
    assert runs(first)[6:12] == [(*s, 8, None, 1), (*v, 8, None, 1), (*i, 8, None, 1)] + [
        (*i, 8, None, 2),
        (*v, 8, None, 2),
        (*s, 8, None, 2),
    ]
    assert len(runs(fake.log, "sluice-int8")) == 6  # two per concurrency, nothing else
    assert ("probe", "sluice-int8") not in fake.log and ("probe", "vllm") in fake.log
    assert fake.resident["sluice"]["sluice-int8:router"] == 31  # resident (idle) during the others' runs
    assert out.resolved["sluice-int8"] == {"auto": "float32"} and not out.errors


def test_a_failed_sluice_int8_start_is_reported_and_plain_sluice_still_runs(fake):
    fake.failing_starts.add(("sluice-int8", "auto"))
    out = run_all(["--peers", "sluice-int8", "--dtypes", "auto"])
    assert fake.log[:3] == [
        ("start", "sluice", "auto"),
        ("start", "sluice-int8", "auto"),
        ("stop", "sluice-int8", "auto"),
    ]
    assert {e[0] for e in runs(fake.log)} == {"sluice"} and len(runs(fake.log)) == 6
    assert len(out.errors) == 1 and out.errors[0].startswith("ERROR: sluice-int8 --dtype auto (start): RuntimeError")
    assert "sluice-int8" not in {s["system"] for s in out.servers}


def test_sluice_int8_is_not_started_without_load_runs_in_the_first_pairing():
    args = parse_args(["--peers", "sluice-int8", "--concurrency", "1", "--skip", "sluice-int8:1"])
    assert not pair_servers.wanted(args, "sluice-int8", first=True)
    args = parse_args(["--peers", "sluice-int8", "--concurrency", "1", "--rates", "2"])
    assert pair_servers.wanted(args, "sluice-int8", first=True)
    assert not pair_servers.wanted(args, "sluice-int8", first=False)
    assert pair_servers.wanted(args, "sluice", first=False)  # the Poisson runs
    assert pair_servers.attach_url(parse_args(["--url", "http://x", "--vllm-url", "http://y"]), "sluice-int8") is None


def test_static_max_batches_limits_each_concurrency_to_that_many_full_batches(monkeypatch):
    from benchmarks import baseline_runs, baselines

    served = []
    monkeypatch.setattr(baselines, "load_model", lambda *a: (None, None))
    monkeypatch.setattr(baselines, "static_batches", lambda m, t, specs, c: served.append((c, len(specs))) or ([], 1.0))
    monkeypatch.setattr(baseline_runs, "measure", lambda args, name, fn: (fn(), 0.0))
    monkeypatch.setattr(baseline_runs, "run_entry", lambda *a: a[:4])
    args = parse_args(["--baselines", "static", "--concurrency", "1", "8", "32", "--static-max-batches", "1"])
    runs, notes = baseline_runs.baseline_runs(args, list(range(64)), {1: 4, 8: 16, 32: 64}, Phases())
    assert served == [(1, 1), (8, 8), (32, 32)]
    assert "static C=32: the first 32 requests (1 batch(es) of 32)" in notes
