"""The `transformers` baselines' runs (see baselines.py), once per benchmark at `--dtype`."""

from __future__ import annotations

import argparse

from benchmarks import baselines
from benchmarks.measure import Phases, log, measure
from benchmarks.server_runs import run_entry
from benchmarks.workload import RequestSpec


def baseline_runs(
    args: argparse.Namespace, specs: list[RequestSpec], plan: dict[int, int], phases: Phases
) -> tuple[list, list]:
    """Every baseline run, and notes on what was skipped or derived."""
    runs, notes = [], [f"skipped: {cell}" for cell in args.skip]
    wanted = {b: [c for c in args.concurrency if f"{b}:{c}" not in args.skip] for b in args.baselines}
    if wanted.get("pipeline"):
        limit = args.pipeline_max_requests or args.num_requests
        levels = [c for c in wanted["pipeline"] if plan[c] <= limit]
        for c in sorted(set(wanted["pipeline"]) - set(levels)):
            notes.append(f"pipeline C={c}: not run ({plan[c]} requests > --pipeline-max-requests {limit})")
        if levels:
            n = max(plan[c] for c in levels)
            log(f"pipeline: serving {n} requests one at a time")
            traces, cpu = phases.timed(
                "pipeline",
                measure,
                args,
                "pipeline",
                lambda: baselines.pipeline_traces(args.model_dir, specs[:n], args.device),
            )
            for c in levels:
                records, duration = baselines.sequential_server(traces[: plan[c]], c)
                runs.append(run_entry("pipeline", "float32", c, specs[: plan[c]], records, duration, cpu))
            notes.append(f"pipeline: {n} requests served one at a time, replayed as a sequential server at C={levels}")
    if wanted.get("static") or wanted.get("continuous"):
        import torch

        model, tok = phases.timed(
            "baseline model load", baselines.load_model, args.model_dir, args.device, getattr(torch, args.dtype)
        )
        for c in wanted.get("static", []):
            n = min(plan[c], c * args.static_max_batches) if args.static_max_batches else plan[c]
            if n < plan[c]:
                notes.append(f"static C={c}: the first {n} requests ({n // c} batch(es) of {c})")
            (records, duration), cpu = phases.timed(
                f"static C={c}",
                measure,
                args,
                f"static C={c}",
                lambda c=c, n=n: baselines.static_batches(model, tok, specs[:n], c),
            )
            runs.append(run_entry("static", args.dtype, c, specs[:n], records, duration, cpu))
        for c in wanted.get("continuous", []):
            (records, duration), cpu = phases.timed(
                f"continuous C={c}",
                measure,
                args,
                f"continuous C={c}",
                lambda c=c: baselines.continuous_batching(model, specs[: plan[c]], c, args.cb_max_batch_tokens),
            )
            runs.append(run_entry("continuous", args.dtype, c, specs[: plan[c]], records, duration, cpu))
    return runs, notes
