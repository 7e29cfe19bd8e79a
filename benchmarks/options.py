"""`python -m benchmarks.run`'s flags (see `make bench` for the ones RESULTS.md uses)."""

from __future__ import annotations

import argparse
from pathlib import Path

from benchmarks import baselines
from benchmarks.loadgen import APIS
from benchmarks.long_prompt import ProbeConfig
from benchmarks.ratios import SLUICE_INT8, VARIANTS

ROOT = Path(__file__).resolve().parent.parent
COMPETITORS = ("vllm",)  # other servers, compared with Sluice in the peer tables
# and Sluice's VARIANTS, Sluice itself started otherwise (SLUICE_INT8: `--quantize int8`): only the first pairing's
# interleaved load runs (no Poisson runs, probes or profile), compared only with that pairing's unquantized Sluice
# (ratios.quantization).
PEERS = COMPETITORS + VARIANTS
DTYPES = ("auto", "float32", "bfloat16", "float16")


def parse_args(argv: list[str] | None = None, description: str | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-dir", default="models/SmolLM2-135M-Instruct")
    p.add_argument("--url", help="attach to a running Sluice instead of starting one")
    p.add_argument(
        "--launcher-args",
        default="--prefix-caching false --max-concurrent-requests 1024",
        help="extra sluice-launcher flags (prefix caching off: runs reuse the same prompts)",
    )
    p.add_argument("--api", choices=APIS, default="openai")
    p.add_argument("--workload", choices=("random", "nano-vllm"), default="random")
    p.add_argument("--num-requests", type=int, default=64)
    p.add_argument("--prompt-len", type=int, nargs=2, default=(32, 256), metavar=("MIN", "MAX"))
    p.add_argument("--output-len", type=int, nargs=2, default=(128, 128), metavar=("MIN", "MAX"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument(
        "--requests-at",
        nargs="*",
        default=[],
        metavar="C=N",
        help="run only the first N requests at concurrency C (all systems alike)",
    )
    p.add_argument("--rates", type=float, nargs="*", default=[], help="also run each server with Poisson arrivals")
    p.add_argument("--baselines", nargs="*", default=list(baselines.BASELINES), choices=baselines.BASELINES)
    p.add_argument("--skip", nargs="*", default=[], metavar="SYSTEM:C", help="cells not to run, e.g. static:1")
    p.add_argument(
        "--pipeline-max-requests",
        type=int,
        default=None,
        help="pipeline serves at most this many requests; concurrencies needing more skip it",
    )
    p.add_argument(
        "--static-max-batches",
        type=int,
        default=None,
        help="static batching serves at most this many batches per concurrency (its throughput is per batch)",
    )
    p.add_argument("--cb-max-batch-tokens", type=int, default=512, help="transformers continuous batching budget")
    p.add_argument("--device", default="cpu", help="for the baselines (Sluice picks its own)")
    p.add_argument(
        "--dtype",
        default="float32",
        choices=DTYPES[1:],
        help="the transformers baselines' dtype (and the servers' when --dtypes is not given)",
    )
    p.add_argument(
        "--dtypes",
        nargs="+",
        default=None,
        choices=DTYPES,
        help="a pairing per dtype: every server started fresh, all resident, runs interleaved; `auto`: each "
        "server's own default (see pairing.py, pair_runs.py)",
    )
    p.add_argument(
        "--peers",
        nargs="*",
        default=[],
        choices=PEERS,
        help="other servers measured like Sluice, on the same workload (none: Sluice and the baselines only); "
        f"{SLUICE_INT8}: Sluice with `--quantize int8`, in the first pairing only, for issue 16's table",
    )
    p.add_argument("--vllm-venv", type=Path, default=ROOT / ".venv-vllm", help="vLLM's venv, created if missing")
    p.add_argument("--vllm-url", help="attach to a running vLLM instead of starting one (development)")
    p.add_argument("--vllm-args", default="", help="extra `vllm serve` flags")
    p.add_argument("--startup-timeout", type=float, default=600, help="longest wait (s) for a server to be healthy")
    p.add_argument(
        "--long-prompt-tokens",
        type=int,
        default=ProbeConfig().long_tokens,
        help="the long-prompt probe's prompt (0: no probe); run on each server's first dtype (`auto` if listed)",
    )
    p.add_argument("--long-prompt-stream-tokens", type=int, default=ProbeConfig().stream_tokens)
    p.add_argument(
        "--constrained",
        type=int,
        default=0,
        metavar="RUNS",
        help="the constrained-decoding probe (constrained.py) on the first pairing's Sluice: RUNS runs each of the "
        "load unconstrained and with every request JSON-schema constrained, in turns (0: no probe)",
    )
    p.add_argument("--constrained-concurrency", type=int, default=32, help="the constrained probe's concurrency")
    p.add_argument(
        "--constrained-requests",
        type=int,
        default=None,
        help="the constrained probe's requests: the workload's first N (default: as many as its concurrency runs)",
    )
    p.add_argument(
        "--constrained-tokens",
        type=int,
        default=None,
        help="new tokens per request in the constrained probe (default: the workload's)",
    )
    p.add_argument("--profile-requests", type=int, default=32, help="requests in the profiled run")
    p.add_argument(
        "--profile",
        type=int,
        default=None,
        metavar="C",
        help="after the first pairing's runs and long-prompt probes, py-spy one extra Sluice run at concurrency C",
    )
    p.add_argument(
        "--max-other-load",
        type=float,
        default=10.0,
        help="%% of the machine's CPU other processes may use during a run before it is run again",
    )
    p.add_argument("--retries", type=int, default=2, help="runs again after contention, at most this many times")
    p.add_argument("--quiet-timeout", type=float, default=900, help="longest wait (s) for a quiet machine")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "out")
    args = p.parse_args(argv)
    args.dtypes = args.dtypes or [args.dtype]
    args.peers = list(dict.fromkeys(args.peers))
    return args


def requests_plan(args: argparse.Namespace) -> dict[int, int]:
    """{concurrency: requests run at it}: the workload's size, lowered by `--requests-at`."""
    caps = {int(c): int(n) for c, n in (x.split("=") for x in args.requests_at)}
    return {c: min(args.num_requests, caps.get(c, args.num_requests)) for c in args.concurrency}


def constrained_requests(args: argparse.Namespace, plan: dict[int, int]) -> int:
    """How many of the workload's requests the constrained probe runs: `--constrained-requests`, else as many as
    the loads run at its concurrency (so that its unconstrained runs are that load), else the whole workload."""
    if args.constrained_requests:
        return min(args.num_requests, args.constrained_requests)
    return plan.get(args.constrained_concurrency, args.num_requests)


def probe_config(args: argparse.Namespace) -> ProbeConfig | None:
    """The long-prompt probe's shape, or None when `--long-prompt-tokens 0`."""
    if args.long_prompt_tokens <= 0:
        return None
    return ProbeConfig(long_tokens=args.long_prompt_tokens, stream_tokens=args.long_prompt_stream_tokens)
