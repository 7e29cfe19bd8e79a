"""The benchmark's arithmetic, workloads and CPU accounting: what RESULTS.md's figures rest on."""

import math
import subprocess
import sys
import time

import numpy as np
import psutil
import pytest

from benchmarks.metrics import RequestRecord, percentile, summarize
from benchmarks.probes import CpuMonitor, settle
from benchmarks.workload import make_requests, poisson_arrivals


@pytest.mark.parametrize("values", [[3.0], [5.0, 1.0], [0.1 * i for i in range(17)], [7.0, 7.0, 1.0, 2.5]])
@pytest.mark.parametrize("q", [0, 50, 90, 99, 100])
def test_percentile_is_numpys_linear_interpolation(values, q):
    assert percentile(values, q) == pytest.approx(np.percentile(values, q))


def test_summary_of_hand_made_records():
    records = [
        RequestRecord(0, prompt_len=10, send_s=0.0, token_s=[0.5, 0.7, 1.0]),  # TTFT 0.5, TPOT 0.25
        RequestRecord(1, prompt_len=20, send_s=1.0, token_s=[1.2, 1.3, 1.4, 2.0], output_tokens=4),
        RequestRecord(2, prompt_len=30, send_s=0.0, error="status 500"),  # failed: left out of every figure
        RequestRecord(3, prompt_len=40, send_s=0.5, token_s=[0.9]),  # one token: no TPOT
    ]
    s = summarize(records)
    assert (s["completed"], s["failed"], s["duration_s"]) == (3, 1, 2.0)
    assert (s["input_tokens"], s["output_tokens"]) == (70, 8)
    assert s["output_throughput"] == 4.0 and s["request_throughput"] == 1.5
    assert s["ttft_s"]["mean"] == pytest.approx((0.5 + 0.2 + 0.4) / 3)
    assert s["tpot_s"]["mean"] == pytest.approx((0.25 + 0.8 / 3) / 2)
    assert sorted([round(x, 6) for x in [0.2, 0.3, 0.1, 0.1, 0.6]]) == sorted(
        round(x, 6) for r in records[:2] for x in r.itls
    )
    assert s["e2e_s"]["p50"] == pytest.approx(1.0)
    assert math.isnan(summarize([], 1.0)["ttft_s"]["mean"])


def test_workloads_are_seeded_prefix_stable_and_in_range(bundled_model_dir):
    a = make_requests(bundled_model_dir, 12, (32, 256), (128, 128), seed=3)
    b = make_requests(bundled_model_dir, 5, (32, 256), (128, 128), seed=3)
    assert a[:5] == b  # a smaller run is the same first requests
    assert all(32 <= len(r.prompt_ids) <= 256 and r.max_tokens == 128 for r in a)
    assert make_requests(bundled_model_dir, 12, (32, 256), (128, 128), seed=4) != a
    times = poisson_arrivals(2000, rate=4.0, seed=1)
    assert times == sorted(times) and 2000 / times[-1] == pytest.approx(4.0, rel=0.1)
    assert poisson_arrivals(3, float("inf")) == [0.0, 0.0, 0.0]


def test_an_idle_resident_servers_cpu_is_other_load_and_shown_on_its_own():
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.2)
        with CpuMonitor({}, {"vllm:busy": busy.pid}) as cpu:
            time.sleep(0.6)
    finally:
        busy.kill()
        busy.wait()
    assert cpu.result["resident_pct"] > 100 / (psutil.cpu_count() or 1) / 3  # most of one core
    assert cpu.result["other_pct"] >= cpu.result["resident_pct"] - 10
    with CpuMonitor({}) as quiet:
        pass
    assert "resident_pct" not in quiet.result


def test_settle_waits_until_a_resident_server_stops_using_the_cpu():
    assert settle({}) == 0.0
    script = "import time\nt = time.time()\nwhile time.time() - t < 0.8: pass\ntime.sleep(60)"
    tail = subprocess.Popen([sys.executable, "-c", script])  # busy 0.8 s after it starts, like vLLM after a load
    try:
        time.sleep(0.1)
        waited = settle({"vllm": tail.pid}, interval_s=0.1)
        assert 0.6 < waited < 3.0
        assert settle({"vllm": tail.pid}, interval_s=0.1) < 0.5  # idle now: two quiet intervals
    finally:
        tail.kill()
        tail.wait()
