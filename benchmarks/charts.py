"""The plots (matplotlib, PNG): one colour per system, one line style and marker per dtype.

Runs are the closed-loop figures the tables use (ratios.compared_runs: a server's "first" run is left out and
its repeated runs of a load make one figure; the CDFs pool those runs' requests).
"""

from __future__ import annotations

from pathlib import Path

from benchmarks.metrics import RequestRecord
from benchmarks.ratios import compared_runs, label
from benchmarks.report import order_key

COLORS = {
    "sluice": "tab:blue",
    "sluice-int8": "tab:cyan",
    "vllm": "tab:red",
    "pipeline": "tab:gray",
    "static": "tab:orange",
    "continuous": "tab:green",
}
STYLES = {"float32": ("-", "o"), "bfloat16": ("--", "s"), "float16": (":", "^")}


def style(run: dict) -> dict:
    """matplotlib keywords for a run's line: colour by system, line style and marker by dtype."""
    line, marker = STYLES.get(run.get("dtype") or "", ("-.", "x"))
    return {"color": COLORS.get(run["system"], "black"), "linestyle": line, "marker": marker, "label": label(run)}


def _series(runs: list[dict]) -> dict[str, list[dict]]:
    """{label: runs sorted by concurrency}, in table order."""
    out: dict[str, list[dict]] = {}
    for run in sorted(compared_runs(runs), key=order_key):
        out.setdefault(label(run), []).append(run)
    return {k: sorted(v, key=lambda r: r["concurrency"]) for k, v in out.items()}


def plot_throughput(runs: list[dict], path: Path) -> None:
    """Output tok/s and mean TPOT against concurrency, one line per system and dtype."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.6))
    for pts in _series(runs).values():
        cs = [r["concurrency"] for r in pts]
        ax1.plot(cs, [r["summary"]["output_throughput"] for r in pts], **style(pts[0]))
        ax2.plot(cs, [1e3 * r["summary"]["tpot_s"]["mean"] for r in pts], **style(pts[0]))
    for ax, ylabel in ((ax1, "output tokens/s"), (ax2, "mean TPOT (ms)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrency (closed-loop clients)")
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    ax1.set_title("Throughput vs concurrency")
    ax2.set_title("Time per output token vs concurrency")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_cdfs(runs: list[dict], path: Path) -> None:
    """CDFs of TTFT, TPOT and end-to-end latency, one column per concurrency, one line per system and dtype."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    closed = sorted(compared_runs(runs), key=order_key)
    levels = sorted({r["concurrency"] for r in closed})
    metrics = (
        ("TTFT (s)", lambda x: x.ttft),
        ("TPOT (ms)", lambda x: 1e3 * (x.tpot or 0)),
        ("E2E (s)", lambda x: x.e2e),
    )
    fig, axes = plt.subplots(
        len(metrics), max(1, len(levels)), figsize=(4.5 * max(1, len(levels)), 3 * len(metrics)), squeeze=False
    )
    for col, c in enumerate(levels):
        for r in (r for r in closed if r["concurrency"] == c):
            recs = [x for x in (RequestRecord(**x) for x in r["records"]) if x.ok]
            if not recs:
                continue
            kw = style(r) | {"marker": None}
            for row, (_, fn) in enumerate(metrics):
                xs = sorted(fn(x) for x in recs)
                xs, ys = xs[:1] + xs, [i / len(xs) for i in range(len(xs) + 1)]
                axes[row][col].step(xs, ys, where="post", **kw)
        for row, (name, _) in enumerate(metrics):
            ax = axes[row][col]
            ax.set_xlabel(name)
            ax.set_ylabel("fraction of requests")
            ax.set_title(f"C={c}: {name.split()[0]}")
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
