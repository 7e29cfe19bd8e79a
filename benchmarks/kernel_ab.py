"""One C++ CPU kernel file at a git revision against the working tree's, loaded together in one
process and timed in turns.

On a shared VM the same kernel's speed drifts between runs by more than most changes move it (on
the 2-core AVX2 EPYC, whole decode steps timed one build after the other suggested a 10% gain for
an attention rewrite that this harness measured 1.2-1.55x slower). Here the working tree's kernels
(built as the shard builds them, `torch.ops.sluice_cpu`) and the revision's copy of one source
file (its ops renamed into `torch.ops.sluice_ab`, built with the same flags and that revision's
headers) take turns on the same inputs, in alternating order; each shape gets both medians and
new ÷ old. Naming the working tree's own state as the revision shows the harness's noise (0.94-1.06
there).

    .venv/bin/python -m benchmarks.kernel_ab attention --rev HEAD
    .venv/bin/python -m benchmarks.kernel_ab int8 --rev HEAD~2 --rows 1 8 32
    .venv/bin/python -m benchmarks.kernel_ab dense --rev HEAD --rows 1 32
    .venv/bin/python -m benchmarks.kernel_ab dense_amx --rev HEAD --rows 1 32 256

Cases: `attention` (paged decode attention on SmolLM2-135M's heads, 10 layers of a cache as large as
--cache-blocks, blocks in order and scattered at random), `int8`, `dense` and `dense_amx` (the model's
30 layers of decoder linears, int8 or bf16 weights, bf16 activations; the AVX2 or the AMX kernels).
"""

from __future__ import annotations

import argparse
import hashlib
import random
import re
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CSRC = "shard/kernels/csrc"
SOURCES = {
    "attention": "cpu_attention.cpp",
    "int8": "cpu_int8.cpp",
    "dense": "cpu_dense_avx2.cpp",
    "dense_amx": "cpu_dense_amx.cpp",
}
COMPANIONS = {
    "int8": ["cpu_int8_avx512.cpp", "cpu_int8_avx2.cpp", "cpu_int8_amx.cpp", "cpu_amx.cpp"],
    "dense_amx": ["cpu_amx.cpp"],
}  # sources a case's file calls into, where the revision has them (cpu_amx.cpp was cpu_int8_amx.cpp)
# SmolLM2-135M: attention heads, and its decoder linears (fused qkv, o, fused gate/up, down) as [N, K].
HEADS, KV_HEADS, HEAD_DIM, BLOCK_SIZE = 9, 3, 64, 16
LINEARS = [(960, 576), (576, 576), (3072, 576), (576, 1536)]
_LIBRARY = re.compile(r"\b(TORCH_LIBRARY(?:_FRAGMENT|_IMPL)?\s*\(\s*)sluice_cpu\b")


def renamed(source: str) -> str:
    """`source` with the ops it defines and implements moved from the sluice_cpu namespace to sluice_ab."""
    return _LIBRARY.sub(r"\1sluice_ab", source)


def _git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=REPO, check=True, capture_output=True, text=True).stdout


def load_revision(case: str, rev: str, cache_dir: Path) -> None:
    """Build and load `rev`'s copy of the case's source file (with that revision's headers and the
    sources it calls into) as sluice_ab."""
    from shard.kernels import cpu_native

    commit = _git("rev-parse", rev).strip()
    build = cache_dir / "kernel_ab" / f"{case}_{cpu_native.build_isa().lower()}_{commit[:12]}"
    build.mkdir(parents=True, exist_ok=True)
    present = set(_git("ls-tree", "--name-only", f"{commit}:{CSRC}").split())
    for name in present:
        if name.endswith(".h"):
            (build / name).write_text(_git("show", f"{commit}:{CSRC}/{name}"))
    sources = []
    for name in [SOURCES[case], *COMPANIONS.get(case, [])]:
        if name in present:
            sources.append(build / f"ab_{name}")
            sources[-1].write_text(renamed(_git("show", f"{commit}:{CSRC}/{name}")))
    digest = hashlib.sha256(b"".join(p.read_bytes() for p in sources)).hexdigest()[:8]
    cpu_native.build_library(f"sluice_ab_{case}_{digest}", sources, build, include_dir=build)


def in_turns(old: Callable[[], None], new: Callable[[], None], rounds: int) -> tuple[float, float]:
    """Median seconds of `old` and `new`, called in turns (old first on even rounds, new first on odd)."""
    times: dict[str, list[float]] = {"old": [], "new": []}
    for r in range(rounds):
        for name in ("old", "new") if r % 2 == 0 else ("new", "old"):
            fn = old if name == "old" else new
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return statistics.median(times["old"]), statistics.median(times["new"])


def attention_cases(args) -> list[tuple[str, Callable[[], None], Callable[[], None], int]]:
    """(label, old, new, calls per timing) for each requests x positions x block layout."""
    import torch

    layers = 10
    caches = [
        tuple(torch.randn(args.cache_blocks, BLOCK_SIZE, KV_HEADS, HEAD_DIM).to(torch.bfloat16) for _ in range(2))
        for _ in range(layers)
    ]
    scattered = random.Random(0).sample(range(args.cache_blocks), args.cache_blocks)
    cases = []
    for reqs, positions in ((1, 40), (1, 100), (1, 300), (4, 200), (32, 64), (32, 250)):
        blocks = -(-positions // BLOCK_SIZE)
        if reqs * blocks > args.cache_blocks:
            continue
        q = torch.randn(reqs, HEADS, HEAD_DIM).to(torch.bfloat16)
        lens = torch.full((reqs,), positions, dtype=torch.int32)
        for layout, ids in (("in order", range(reqs * blocks)), ("scattered", scattered[: reqs * blocks])):
            tables = torch.tensor(list(ids), dtype=torch.int32).view(reqs, blocks)

            def run(op, q=q, tables=tables, lens=lens):
                for k, v in caches:
                    op(q, k, v, tables, lens, HEAD_DIM**-0.5)

            old, new = torch.ops.sluice_ab.paged_attention_decode, torch.ops.sluice_cpu.paged_attention_decode
            # the same attention to bf16's rounding, however differently the two compute it
            a, b = (op(q, *caches[0], tables, lens, HEAD_DIM**-0.5).float() for op in (old, new))
            torch.testing.assert_close(a, b, atol=2e-2, rtol=2e-2)
            label = f"{reqs} x {positions} positions, {layout}"
            cases.append((label, lambda run=run, op=old: run(op), lambda run=run, op=new: run(op), layers))
    return cases


def linear_cases(args, case: str) -> list[tuple[str, Callable[[], None], Callable[[], None], int]]:
    """(label, old, new, calls per timing) for each row count, over 30 layers of the decoder linears."""
    import torch

    from shard.kernels import cpu_int8

    shapes = LINEARS * 30
    namespaces = {"old": torch.ops.sluice_ab, "new": torch.ops.sluice_cpu}
    packed = {"old": [], "new": []}
    for n, k in shapes:
        w = torch.randn(n, k) * 0.05
        for ns, ops in namespaces.items():
            if case == "int8":
                w8, scales = cpu_int8.quantize_per_channel(w)
                packed[ns].append(ops.pack_int8_weight(w8, scales))
            else:
                packed[ns].append(getattr(ops, f"pack_{case}")(w.to(torch.bfloat16)))
    cases = []
    for rows in args.rows:
        xs = {k: torch.randn(rows, k).to(torch.bfloat16) for k in {k for _, k in LINEARS}}

        def run(ns, xs=xs):
            ops = namespaces[ns]
            for (n, k), handle in zip(shapes, packed[ns]):
                if case == "int8":
                    ops.int8_linear(xs[k], handle, n, None, cpu_int8.NEVER)
                else:
                    getattr(ops, f"{case}_linear")(xs[k], handle, n, None)

        cases.append((f"{rows} rows", lambda run=run: run("old"), lambda run=run: run("new"), len(shapes)))
    return cases


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("case", choices=sorted(SOURCES))
    p.add_argument("--rev", default="HEAD", help="the git revision of the old build (default HEAD)")
    p.add_argument("--rounds", type=int, default=12, help="timings of each build per shape")
    p.add_argument("--rows", type=int, nargs="+", help="int8/dense(_amx): activation rows (default 1 4 8 32 64)")
    p.add_argument("--cache-blocks", type=int, help="attention: blocks per layer's K and V cache (default 4096)")
    args = p.parse_args(argv)
    if args.case == "attention" and args.rows is not None:
        p.error("--rows is for the int8 and dense cases")
    if args.case != "attention" and args.cache_blocks is not None:
        p.error("--cache-blocks is for the attention case")
    args.rows = args.rows or [1, 4, 8, 32, 64]
    args.cache_blocks = args.cache_blocks or 4096

    from shard.config import default_cache_dir
    from shard.kernels import cpu_native

    cpu_native.load(default_cache_dir())
    load_revision(args.case, args.rev, default_cache_dir())
    cases = attention_cases(args) if args.case == "attention" else linear_cases(args, args.case)
    print(f"{SOURCES[args.case]}: {args.rev} (old) against the working tree (new), median µs per call")
    for label, old, new, calls in cases:
        t_old, t_new = in_turns(old, new, args.rounds)
        old_us, new_us = t_old / calls * 1e6, t_new / calls * 1e6
        print(f"  {label:32s} old {old_us:8.1f}  new {new_us:8.1f}  new/old {t_new / t_old:.2f}", flush=True)


if __name__ == "__main__":
    main()
