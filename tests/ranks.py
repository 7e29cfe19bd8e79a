"""Processes for the tensor-parallel ranks that tests start themselves (gloo, on the CPU)."""

import multiprocessing as mp
from multiprocessing.context import BaseContext

_PRELOAD = ["torch", "transformers", "shard.runner", "shard.dist"]


def context() -> BaseContext:
    """A forkserver context whose server has imported torch, transformers and the shard once: each
    rank starts in a fraction of a second, where a spawned one spends ~3 s importing them. The
    server imports but never runs torch, so the forked ranks start clean."""
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(_PRELOAD)
    return ctx
