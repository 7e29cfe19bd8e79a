"""Which server starts a benchmark needs for its dtypes, and which runs are compared with which.

`--dtypes` lists dtype requests, each applied to every server (Sluice and each peer): a dtype name
(`float32`, `bfloat16`) or `auto`, meaning the server's own default (Sluice: `--dtype auto`;
vLLM: `--dtype auto`, bfloat16 on a CPU with AVX-512 BF16). A request is a *pairing*: Sluice at
that request against the peer at the same request ("float32" against "float32", "default"
against "default").

A server start is keyed by the request; the dtype the server actually used is read back after
it started. A later request that asks for a dtype an earlier start already resolved to reuses
that start's runs instead of starting again (Sluice's `auto` may well be float32), which is why
`auto` goes first.
"""

from __future__ import annotations

AUTO = "auto"


def start_order(requests: list[str]) -> list[str]:
    """The requests without duplicates, `auto` first (so that it can stand in for an explicit dtype)."""
    unique = list(dict.fromkeys(requests))
    return sorted(unique, key=lambda r: r != AUTO)


def pairing_name(request: str) -> str:
    """How a request is called in the tables: "default" for `auto`, else the dtype."""
    return "default" if request == AUTO else request


def covered_by(request: str, resolved: dict[str, str]) -> str | None:
    """The earlier request whose start already serves `request` ({request: dtype used}), or None.

    `auto` is only covered by an earlier `auto` (what it resolves to is known only once started).
    """
    if request in resolved:
        return request
    if request == AUTO:
        return None
    return next((earlier for earlier, dtype in resolved.items() if dtype == request), None)


def pairings(requests: list[str], resolved: dict[str, dict[str, str]]) -> list[dict]:
    """One row per request: the dtype each system used for it.

    `resolved` is {system: {request: dtype used}}; a system missing a request leaves it out of the row.
    A request every system served at the dtypes of an earlier row (`bfloat16` where every default
    is bfloat16) ran the same starts: it has no row of its own.
    """
    rows = []
    for request in dict.fromkeys(requests):
        dtypes = {system: done[request] for system, done in resolved.items() if request in done}
        if all(dtypes != row["dtypes"] for row in rows):
            rows.append({"request": request, "name": pairing_name(request), "dtypes": dtypes})
    return rows
