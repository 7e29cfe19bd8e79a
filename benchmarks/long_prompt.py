"""Long-prompt probe: how much a long prompt's arrival stalls the requests already decoding.

`streams` requests decode a long output each (EOS ignored). Once every one of them has streamed
`trigger_tokens` tokens, one request with a `long_tokens`-token prompt is sent. For the decoding
streams, the figures are their inter-token gaps:

- over their whole life: the median gap (ITL) and the worst;
- in the arrival window, from the long request's send until its first token plus `after_s`: the
  worst gap, and that worst ÷ the whole-life median (target: at most `TARGET`, i.e. a server that
  chunks the long prefill between decode steps instead of stopping every stream for all of it).

A gap belongs to the window when it overlaps it (it ends after the window opens and starts before
it closes), so the gap that spans the long prefill counts even though it began before the send.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import asdict, dataclass

import aiohttp

from benchmarks.loadgen import send_one
from benchmarks.metrics import RequestRecord, percentile
from benchmarks.workload import make_requests

TARGET = 4.0  # worst gap during the arrival <= TARGET x the median gap


@dataclass(frozen=True, slots=True)
class ProbeConfig:
    """The probe's shape; the defaults are `make bench`'s."""

    streams: int = 4
    stream_prompt_tokens: int = 128
    stream_tokens: int = 256
    trigger_tokens: int = 20
    long_tokens: int = 2000
    long_output_tokens: int = 16
    after_s: float = 0.5


def gaps(token_s: list[float]) -> list[tuple[float, float]]:
    """(start, end) of each gap between successive token arrivals."""
    return list(zip(token_s, token_s[1:]))


def window_gaps(token_s: list[float], start: float, end: float) -> list[float]:
    """Lengths of the gaps that overlap [start, end]."""
    return [b - a for a, b in gaps(token_s) if b > start and a < end]


def summarize_probe(streams: list[list[float]], long_send_s: float, long_first_s: float | None, after_s: float) -> dict:
    """The probe's figures from the streams' token arrival times and the long request's send and first token.

    Times are seconds on one clock. Without a first token for the long request the window ends at
    the streams' last token. `covered` says whether every stream was still decoding at the window's
    end (else the window saw fewer than all streams and the figure is a lower bound).
    """
    end_of_streams = max((t[-1] for t in streams if t), default=long_send_s)
    window_end = (end_of_streams if long_first_s is None else long_first_s) + after_s
    whole = [b - a for t in streams for a, b in gaps(t)]
    window = [g for t in streams for g in window_gaps(t, long_send_s, window_end)]
    median = percentile(whole, 50)
    worst_window = max(window, default=float("nan"))
    worst = max(whole, default=float("nan"))
    return {
        "median_itl_s": median,
        "worst_itl_s": worst,
        "worst_over_median": worst / median if median else float("nan"),
        "window_s": (long_send_s, window_end),
        "window_gaps": len(window),
        "worst_window_itl_s": worst_window,
        "window_worst_over_median": worst_window / median if median else float("nan"),
        "long_ttft_s": None if long_first_s is None else long_first_s - long_send_s,
        "covered": all(t and t[-1] >= window_end for t in streams),
        "target": TARGET,
        "meets_target": bool(median) and worst_window <= TARGET * median,
    }


async def run_probe(url: str, model_dir: str, config: ProbeConfig = ProbeConfig(), seed: int = 0) -> dict:
    """Run the probe against a server's `/v1/completions`; the summary plus the raw token times."""
    c = config
    stream_specs = make_requests(model_dir, c.streams, (c.stream_prompt_tokens,) * 2, (c.stream_tokens,) * 2, seed + 1)
    long_spec = make_requests(model_dir, 1, (c.long_tokens,) * 2, (c.long_output_tokens,) * 2, seed + 2)[0]
    timeout = aiohttp.ClientTimeout(total=None, sock_read=600)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), timeout=timeout) as session:
        t0 = time.perf_counter()
        records = [RequestRecord(s.index, s.prompt_len, 0.0) for s in stream_specs]
        tasks = [asyncio.create_task(send_one(session, url, "openai", s, t0, r)) for s, r in zip(stream_specs, records)]
        while not all(len(r.token_s) >= c.trigger_tokens or t.done() for r, t in zip(records, tasks)):
            await asyncio.sleep(0.002)
        long_record = await send_one(session, url, "openai", long_spec, t0)
        await asyncio.gather(*tasks)
    failed = [r.error for r in [*records, long_record] if r.error]
    if failed:
        raise RuntimeError(f"long-prompt probe: a request failed: {failed[0]}")
    first = long_record.token_s[0] if long_record.token_s else None
    summary = summarize_probe([r.token_s for r in records], long_record.send_s, first, c.after_s)
    return {
        "config": asdict(c),
        **summary,
        "streams_token_s": [r.token_s for r in records],
        "long_request": long_record.to_json(),
    }
