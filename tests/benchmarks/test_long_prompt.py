"""The long-prompt probe's arithmetic (benchmarks/long_prompt.py), on hand-made token times."""

import math

import pytest

from benchmarks.long_prompt import TARGET, summarize_probe, window_gaps


def steady(start: float, step: float, n: int, stall_at: float | None = None, stall: float = 0.0) -> list[float]:
    """`n` token times every `step` s from `start`; the first token after `stall_at` comes `stall` s late."""
    times, t, stalled = [], start, False
    for _ in range(n):
        if stall_at is not None and not stalled and t > stall_at:
            t += stall
            stalled = True
        times.append(round(t, 9))
        t += step
    return times


def test_window_takes_every_gap_that_overlaps_it():
    tokens = [0.0, 1.0, 2.0, 5.0, 6.0]  # gaps 1, 1, 3, 1
    assert window_gaps(tokens, 2.5, 3.0) == [3.0]  # inside one gap: that gap
    assert window_gaps(tokens, 1.5, 5.5) == [1.0, 3.0, 1.0]
    assert window_gaps(tokens, 6.0, 9.0) == []  # a gap ending exactly at the start is before it
    assert window_gaps([1.0], 0.0, 9.0) == []


def test_a_stall_spanning_the_arrival_is_the_window_worst():
    # 4 streams at 20 ms; the long prompt is sent at 0.5 s and stalls every stream 300 ms (gap 320 ms).
    streams = [steady(0.003 * i, 0.02, 60, stall_at=0.5, stall=0.3) for i in range(4)]
    s = summarize_probe(streams, long_send_s=0.5, long_first_s=0.83, after_s=0.1)
    assert s["median_itl_s"] == pytest.approx(0.02)
    assert s["worst_itl_s"] == pytest.approx(0.32)
    assert s["worst_window_itl_s"] == pytest.approx(0.32)
    assert s["window_worst_over_median"] == pytest.approx(16.0)
    assert s["worst_over_median"] == pytest.approx(16.0)
    assert s["window_s"] == pytest.approx((0.5, 0.93))
    assert s["long_ttft_s"] == pytest.approx(0.33)
    assert s["covered"] and not s["meets_target"]


def test_chunked_prefill_meets_the_target_and_a_stall_outside_the_window_does_not_count():
    # Steps slow to 60 ms (3x) while the prompt is chunked in; a 200 ms hiccup long after the window.
    streams = []
    for i in range(4):
        t = [0.001 * i + 0.02 * k for k in range(30)]  # until 0.58 s
        t += [t[-1] + 0.06 * k for k in range(1, 11)]  # the long prompt's chunks, until 1.18 s
        t += [t[-1] + 0.02 * k for k in range(1, 60)]
        t += [t[-1] + 0.2, t[-1] + 0.22]
        streams.append(t)
    s = summarize_probe(streams, long_send_s=0.6, long_first_s=1.18, after_s=0.1)
    assert s["worst_window_itl_s"] == pytest.approx(0.06)
    assert s["window_worst_over_median"] == pytest.approx(3.0)
    assert s["meets_target"] and TARGET == 4.0
    assert s["worst_itl_s"] == pytest.approx(0.2)  # the whole life sees the hiccup
    assert s["worst_over_median"] == pytest.approx(10.0)


def test_streams_that_end_inside_the_window_are_flagged_and_no_first_token_closes_at_the_end():
    streams = [[0.0, 0.1, 0.2, 0.3], [0.0, 0.1, 0.2, 1.5]]
    s = summarize_probe(streams, long_send_s=0.25, long_first_s=1.0, after_s=0.2)
    assert not s["covered"]  # the first stream's last token (0.3 s) is before the window's end (1.2 s)
    assert s["worst_window_itl_s"] == pytest.approx(1.3)
    none = summarize_probe(streams, long_send_s=0.25, long_first_s=None, after_s=0.0)
    assert none["long_ttft_s"] is None and none["window_s"] == pytest.approx((0.25, 1.5))
    empty = summarize_probe([[0.0], [0.0]], 0.0, 0.1, 0.0)
    assert math.isnan(empty["median_itl_s"]) and not empty["meets_target"]
