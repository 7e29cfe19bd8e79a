"""A drift check: the machine's memory bandwidth, measured quickly before and after a pairing's runs.

On a shared VM the speed of the same server drifts by 10-30% over minutes, and memory bandwidth
(what a small model's decode step is bound by) moves with it. A torch sum over a 256 MiB float32
tensor on every core, best of 3, takes about 0.1 s; its read bandwidth before and after a
pairing's runs tells a reader how stable the machine was while those figures were taken.
"""

from __future__ import annotations

import math
import time

MIB = 2**20


def memory_bandwidth_gbs(mib: int = 256, repeats: int = 3) -> float:
    """Read bandwidth in GB/s (1e9 bytes) of `torch.sum` over an `mib` MiB float32 tensor, best of `repeats`."""
    import torch

    x = torch.ones(mib * MIB // 4, dtype=torch.float32)  # written once: every page is mapped before timing
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - start)
    return x.numel() * 4 / best / 1e9


def check(pairing: str, before_gbs: float, after_gbs: float) -> dict:
    """A pairing's drift entry for results.json: bandwidth before and after its runs, and the change in %."""
    change = 100 * (after_gbs / before_gbs - 1) if before_gbs else math.nan
    return {"pairing": pairing, "before_gbs": before_gbs, "after_gbs": after_gbs, "change_pct": change}


def note(entry: dict, resident_pct: float | None = None, settle_s: float | None = None) -> str:
    """One line for the report, e.g. "default pairing: memory bandwidth 38.2 -> 41.0 GB/s (+7%) ...", with the
    most CPU an idle resident server used during another's run and the time spent letting them go idle."""
    text = (
        f"{entry['pairing']} pairing: memory bandwidth {entry['before_gbs']:.1f} -> {entry['after_gbs']:.1f} GB/s "
        f"({entry['change_pct']:+.0f}%) before -> after its runs"
    )
    if resident_pct is not None:
        text += f"; the idle resident server used at most {resident_pct:.1f}% of the CPU during the other's runs"
    if settle_s:
        text += f", after {settle_s:.0f} s in all waiting for it to go idle before them"
    return text
