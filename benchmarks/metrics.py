"""Per-request records and the run summary (vLLM's `bench serve` definitions).

- TTFT: first token's arrival minus the request's send time (queueing included).
- ITL: gaps between successive token arrivals (per streamed event; one event per token here).
- TPOT per request: (E2E - TTFT) / (output tokens - 1), for requests with more than one token.
- E2E: last token's arrival minus send time.
- Throughputs divide by the run's duration: first send to last completion.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

PERCENTILES = (50, 90, 99)


@dataclass(slots=True)
class RequestRecord:
    """What a client saw of one request; times are seconds since the run started."""

    index: int
    prompt_len: int
    send_s: float
    token_s: list[float] = field(default_factory=list)  # arrival time of each generated token
    output_tokens: int = 0  # from the server's usage when it says so, else len(token_s)
    error: str | None = None
    text: str | None = None  # the generated text, where the run keeps it (the constrained probe's check)

    @property
    def ok(self) -> bool:
        return self.error is None and bool(self.token_s)

    @property
    def ttft(self) -> float:
        return self.token_s[0] - self.send_s

    @property
    def e2e(self) -> float:
        return self.token_s[-1] - self.send_s

    @property
    def tpot(self) -> float | None:
        n = self.output_tokens or len(self.token_s)
        return (self.e2e - self.ttft) / (n - 1) if n > 1 else None

    @property
    def itls(self) -> list[float]:
        return [b - a for a, b in zip(self.token_s, self.token_s[1:])]

    def to_json(self) -> dict:
        out = asdict(self)
        if out["text"] is None:
            del out["text"]
        return out


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile (numpy's default), NaN for no values."""
    if not values:
        return math.nan
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def stats(values: list[float]) -> dict[str, float]:
    """mean, p50, p90, p99 of `values` (seconds)."""
    out = {"mean": sum(values) / len(values) if values else math.nan}
    out.update({f"p{q}": percentile(values, q) for q in PERCENTILES})
    return out


def summarize(records: list[RequestRecord], duration_s: float | None = None) -> dict:
    """The run's figures; `duration_s` defaults to first send to last token."""
    done = [r for r in records if r.ok]
    if duration_s is None:
        duration_s = max((r.token_s[-1] for r in done), default=0.0) - min((r.send_s for r in records), default=0.0)
    output_tokens = sum(r.output_tokens or len(r.token_s) for r in done)
    input_tokens = sum(r.prompt_len for r in done)
    per_s = (lambda x: x / duration_s) if duration_s > 0 else (lambda x: math.nan)
    return {
        "completed": len(done),
        "failed": len(records) - len(done),
        "duration_s": duration_s,
        "input_tokens": input_tokens,
        "output_tokens": output_tokens,
        "request_throughput": per_s(len(done)),
        "output_throughput": per_s(output_tokens),
        "total_token_throughput": per_s(input_tokens + output_tokens),
        "ttft_s": stats([r.ttft for r in done]),
        "tpot_s": stats([t for r in done if (t := r.tpot) is not None]),
        "itl_s": stats([x for r in done for x in r.itls]),
        "e2e_s": stats([r.e2e for r in done]),
    }
