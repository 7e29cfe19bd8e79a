"""`sluice-shard`: load one tensor-parallel slice of a model and serve it over gRPC."""

import argparse
import asyncio
import ctypes
import logging
import signal

from pythonjsonlogger.json import JsonFormatter

import configflags
from shard import dist
from shard.config import ShardConfig


def parse_args(argv: list[str] | None = None) -> ShardConfig:
    """The shard's config from its flags (derived from ShardConfig), and its logging set up."""
    p = argparse.ArgumentParser(prog="sluice-shard", description=__doc__)
    configflags.add_arguments(p, ShardConfig)
    config = configflags.build(ShardConfig, p.parse_args(argv), p)
    handler = logging.StreamHandler()
    handler.setFormatter(
        JsonFormatter(
            "%(asctime)s %(levelname)s %(name)s %(message)s",
            rename_fields={"asctime": "time", "levelname": "level", "name": "target"},
            static_fields={"process": f"shard-{config.rank}"},
        )
        if config.json_output
        else logging.Formatter(f"%(asctime)s %(levelname)s shard-{config.rank} %(name)s: %(message)s")
    )
    logging.basicConfig(level=logging.INFO, handlers=[handler])
    return config


def keep_freed_memory() -> bool:
    """Let glibc reuse freed memory instead of giving it back to the OS after each op.

    By default, buffers over a dynamic threshold are mmap'ed and unmapped one by one, and freed
    heap tops are trimmed, so a prefill's activations (tens of MB per op) are page-faulted in
    afresh by every layer: on the CPU that made prefill ~25% slower. False where libc is not glibc."""
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_top_pad, m_mmap_threshold = -1, -2, -3
    return all(
        (
            mallopt(m_mmap_threshold, 32 << 20),  # the largest glibc accepts
            mallopt(m_trim_threshold, 1 << 30),
            mallopt(m_top_pad, 64 << 20),
        )
    )


async def _main(config: ShardConfig) -> None:
    from shard.runner import ModelRunner, resolve_device
    from shard.server import model_thread, serve
    from shard.tracing import setup_tracing

    provider = setup_tracing(f"{config.otlp_service_name}.shard", config.otlp_endpoint, config.rank)

    def load() -> ModelRunner:
        dist.init(config.rank, config.world_size, config.master_addr, config.master_port, resolve_device(config))
        return ModelRunner(config)

    executor, loop = model_thread(), asyncio.get_running_loop()
    runner = await loop.run_in_executor(executor, load)
    logging.getLogger(__name__).info(
        "loaded %s (%s on %s, kernels: %s)", config.model_dir, runner.dtype, runner.device, runner.kernel_backend
    )
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await serve(runner, executor, config.address, stop)
    try:  # after any step still running on the model thread; a rank stuck in a collective is not waited for
        await asyncio.wait_for(loop.run_in_executor(executor, dist.shutdown), timeout=10)
    except TimeoutError:
        logging.getLogger(__name__).warning("left without closing the tensor-parallel group")
    if provider is not None:
        provider.shutdown()  # flush the last spans


def main(argv: list[str] | None = None) -> None:
    config = parse_args(argv)
    keep_freed_memory()
    asyncio.run(_main(config))
