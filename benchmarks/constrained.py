"""Constrained-decoding probe: what masking every token to a JSON schema costs at concurrency C.

On one resident, warm Sluice server (the first pairing's, `auto` in `make bench`), the same requests
(the first n of the workload: by default the very load the runs table shows at C=32) run as they
are ("unconstrained") and with every request constrained to `SCHEMA` through `/v1/completions`'
`response_format` ("constrained"), taking turns U C C U (then U C, C U, ... for more runs: the
order that cancels a drift linear in time, as schedule.py does for the loads after a cold start;
the server is warm here). Always through `/v1/completions` (`--api` notwithstanding).
One constrained request first, not measured, compiles the grammar (the server caches it by content).

`SCHEMA` is an object whose one required string has `minLength` 2000: no document can complete
within the output length, so the grammar never ends a request early and, with `ignore_eos` and
`min_tokens` as every load sends, both loads generate exactly the same number of tokens; the ratio
of their output throughputs is then the cost of the masking per token (target: `TARGET`).

After each constrained run every output is checked: the request must have generated all its tokens
and its text must be a prefix of a document valid under `SCHEMA` (`valid_prefix`); any that is not
is counted (and the target is then not met). A request that fails outright fails the probe.

Its size in `make bench` (`--constrained 2`): the C=32 load itself, 64 requests x 128 new tokens, so
that its unconstrained figure can be checked against the runs table's; at ~730 tok/s (bfloat16 on
the 2-core machine) an unconstrained run takes ~11 s, and the four runs with the warm-up and the
waits for vLLM to idle about a minute (about 1.5 minutes if constraining halved the throughput).
`--constrained-requests 32 --constrained-tokens 64` would cut that to a quarter, at the price of a
ratio diluted by the prompts' prefill (one wave of 32 prompts against 64 steps of decode).
"""

from __future__ import annotations

import math
import re
from dataclasses import replace

from benchmarks.metrics import RequestRecord
from benchmarks.workload import RequestSpec

TARGET = 0.85  # constrained >= TARGET x unconstrained output tokens/s (issue 15)
UNCONSTRAINED, CONSTRAINED = "unconstrained", "constrained"
MIN_LENGTH = 2000
SCHEMA = {
    "type": "object",
    "properties": {"text": {"type": "string", "minLength": MIN_LENGTH}},
    "required": ["text"],
    "additionalProperties": False,
}
RESPONSE_FORMAT = {"type": "json_schema", "json_schema": {"name": "doc", "schema": SCHEMA}}

_WS = " \t\n\r"
_CHAR = r'(?:[^"\\\x00-\x1f]|\\["\\/bfnrt]|\\u[0-9a-fA-F]{4})'  # one character of a JSON string
_OPEN_STRING = re.compile(rf"{_CHAR}*(?:\\(?:u[0-9a-fA-F]{{0,3}})?)?")  # ends inside the string
_CLOSED_STRING = re.compile(rf'{_CHAR}{{{MIN_LENGTH},}}"[ \t\n\r]*(?:\}}[ \t\n\r]*)?')  # long enough, closed


def valid_prefix(text: str) -> bool:
    """Whether `text` is a prefix of a JSON document valid under `SCHEMA` (any JSON whitespace)."""
    i, n = 0, len(text)
    for literal in ("{", '"text"', ":", '"'):
        while i < n and text[i] in _WS:
            i += 1
        piece = text[i : i + len(literal)]
        if not literal.startswith(piece):
            return False
        if i + len(literal) >= n:  # the text ends inside (or right after) this literal
            return True
        i += len(literal)
    rest = text[i:]
    return bool(_OPEN_STRING.fullmatch(rest) or _CLOSED_STRING.fullmatch(rest))


def probe_specs(specs: list[RequestSpec], n: int, max_tokens: int | None = None) -> list[RequestSpec]:
    """The probe's requests: the workload's first `n`, with `max_tokens` new tokens each if given."""
    return [replace(s, max_tokens=max_tokens) if max_tokens else s for s in specs[:n]]


def order(runs: int) -> list[tuple[str, int]]:
    """(mode, round) of each run: U C, then C U, then U C, ... (`runs` of each mode)."""
    out = []
    for r in range(1, runs + 1):
        pair = (UNCONSTRAINED, CONSTRAINED) if r % 2 else (CONSTRAINED, UNCONSTRAINED)
        out += [(mode, r) for mode in pair]
    return out


def bad_outputs(records: list[RequestRecord], specs: list[RequestSpec]) -> list[dict]:
    """The constrained outputs that are not prefixes of valid documents or stopped short of their tokens."""
    bad = []
    for record, spec in zip(records, specs):
        tokens = record.output_tokens or len(record.token_s)
        text = record.text or ""
        problem = (
            "not a prefix of a valid document"
            if not valid_prefix(text)
            else f"{tokens} tokens of {spec.max_tokens}"
            if tokens != spec.max_tokens
            else None
        )
        if problem:
            bad.append({"index": spec.index, "problem": problem, "text": text[:200]})
    return bad


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else math.nan


def summarize_runs(runs: list[dict]) -> dict:
    """The probe's figures from its runs ({"mode", "summary", "server_steps", "bad_count"} each, in run order): each
    mode's mean output tokens/s (and its runs'), their ratio, the mean step period, and the outputs checked."""
    out: dict = {}
    for mode in (UNCONSTRAINED, CONSTRAINED):
        mine = [r for r in runs if r["mode"] == mode]
        tok_s = [r["summary"]["output_throughput"] for r in mine]
        periods = [r["server_steps"]["all"]["period_ms"] for r in mine if "all" in r.get("server_steps", {})]
        out[mode] = {"tok_s": _mean(tok_s), "run_tok_s": tok_s, "period_ms": _mean(periods)}
    checked = [r for r in runs if r["mode"] == CONSTRAINED]
    bad = sum(r["bad_count"] for r in checked)
    unconstrained, constrained = out[UNCONSTRAINED]["tok_s"], out[CONSTRAINED]["tok_s"]
    ratio = constrained / unconstrained if unconstrained and not math.isnan(unconstrained) else math.nan
    return out | {
        "ratio": ratio,
        "target": TARGET,
        "outputs_checked": sum(r["summary"]["completed"] for r in checked),
        "bad_outputs": bad,
        "meets_target": not math.isnan(ratio) and ratio >= TARGET and bad == 0,
    }
