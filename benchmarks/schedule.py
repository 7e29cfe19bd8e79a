"""The order in which the servers of one dtype pairing run their loads, interleaved against drift.

The servers of a pairing (Sluice, then each peer) are all resident and take turns, so a slow
period of the shared machine falls on all of them instead of on whichever happened to run then.
Every server runs every one of its concurrencies twice:

- its largest, "first" (the cold run right after the warm-up) and "repeat" (the table's figure),
  in the order A B A B: every first run before any repeat;
- each other concurrency, from large to small, in the order A B B A, which cancels a drift that is
  linear in time (the two runs of each server average to the same moment).

With one server the order is simply its two runs per concurrency.
"""

from __future__ import annotations

from dataclasses import dataclass

from benchmarks.ratios import FIRST, REPEAT


@dataclass(frozen=True, slots=True)
class Slot:
    """One run of the schedule: which server, at which concurrency, its phase (the largest concurrency's
    "first" or "repeat", else None) and its round (1 or 2: the server's first or second run at this load)."""

    system: str
    concurrency: int
    phase: str | None
    round: int


def interleave(levels: dict[str, list[int]]) -> list[Slot]:
    """The runs of a pairing in order; `levels` is {system: its concurrencies}, in the servers' order."""
    systems = [s for s, cs in levels.items() if cs]
    largest = {s: max(levels[s]) for s in systems}
    out = []
    for c in sorted({c for s in systems for c in levels[s]}, reverse=True):
        at = [s for s in systems if c in levels[s]]
        cold = [s for s in at if largest[s] == c]
        passes = (at, at) if cold else (at, at[::-1])  # A B A B at a cold start, else A B B A
        for rnd, order in enumerate(passes, 1):
            for s in order:
                phase = (FIRST if rnd == 1 else REPEAT) if s in cold else None
                out.append(Slot(s, c, phase, rnd))
    return out


def run_name(c, phase: str | None = None, round_: int | None = None) -> str:
    """How a run is named in logs and notes: "C=32 (first)", "C=8 (run 2)", "C=8"."""
    tag = phase or (f"run {round_}" if round_ else None)
    return f"C={c}" + (f" ({tag})" if tag else "")
