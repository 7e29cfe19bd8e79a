"""run.system_runs with fake servers: which starts happen per dtype request, that every start is
stopped, and that one server's failure is reported without losing the others."""

import pytest

from benchmarks import run
from benchmarks.measure import Phases
from benchmarks.options import parse_args

DEFAULTS = {"sluice": "float32", "vllm": "bfloat16"}  # what each resolves `auto` to here


class FakeServer:
    def __init__(self, system, request, log, fail=False):
        self.system, self.request, self.log, self.fail = system, request, log, fail
        self.url, self.startup_s, self.pids, self.dtype = "http://fake", 1.0, {}, None

    def start(self, timeout_s):
        self.log.append(("start", self.system, self.request))
        if self.fail:
            raise RuntimeError("vllm serve exited with 1 before it was healthy")
        self.dtype = DEFAULTS[self.system] if self.request == "auto" else self.request

    def stop(self):
        self.log.append(("stop", self.system, self.request))

    def describe(self):
        return {"system": self.system, "request": self.request, "dtype": self.dtype}


@pytest.fixture
def fake(monkeypatch):
    """(log of starts, runs and stops; set of (system, request) whose start fails)."""
    log, failing = [], set()

    def make_server(args, system, request):
        return FakeServer(system, request, log, fail=(system, request) in failing)

    def server_runs(args, server, specs, plan, probe=None, profile=False):
        log.append(("runs", server.system, server.dtype, probe is not None, profile))
        return {"runs": [{"system": server.system, "dtype": server.dtype}], "long_prompt": None, "profile": {}}

    monkeypatch.setattr(run, "make_server", make_server)
    monkeypatch.setattr(run, "server_runs", server_runs)
    return log, failing


def test_auto_that_resolves_to_float32_serves_both_pairings_with_one_start(fake):
    log, _ = fake
    args = parse_args(["--peers", "vllm", "--dtypes", "float32", "auto", "--profile", "32"])
    out = run.system_runs(args, "sluice", [], {}, Phases())
    assert log == [("start", "sluice", "auto"), ("runs", "sluice", "float32", True, True), ("stop", "sluice", "auto")]
    assert out["resolved"] == {"auto": "float32", "float32": "float32"}
    assert out["servers"][0]["serves"] == ["auto", "float32"] and not out["errors"]


def test_a_peer_whose_default_differs_starts_twice_and_probes_only_its_default(fake):
    log, _ = fake
    args = parse_args(["--peers", "vllm", "--dtypes", "auto", "float32"])
    out = run.system_runs(args, "vllm", [], {}, Phases())
    assert [e for e in log if e[0] == "runs"] == [
        ("runs", "vllm", "bfloat16", True, False),
        ("runs", "vllm", "float32", False, False),
    ]
    assert [e for e in log if e[0] == "stop"] == [("stop", "vllm", "auto"), ("stop", "vllm", "float32")]
    assert out["resolved"] == {"auto": "bfloat16", "float32": "float32"}


def test_a_failed_start_is_stopped_reported_and_the_next_dtype_still_runs(fake):
    log, failing = fake
    failing.add(("vllm", "auto"))
    args = parse_args(["--peers", "vllm", "--dtypes", "auto", "float32"])
    out = run.system_runs(args, "vllm", [], {}, Phases())
    assert ("stop", "vllm", "auto") in log and ("runs", "vllm", "float32", False, False) in log
    assert out["resolved"] == {"float32": "float32"}
    assert len(out["errors"]) == 1 and "exited with 1" in out["errors"][0]
