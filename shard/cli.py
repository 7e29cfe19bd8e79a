"""`sluice-shard`: load one tensor-parallel slice of a model and serve it over gRPC."""

import argparse
import asyncio
import ctypes
import logging
import signal
from pathlib import Path

from pythonjsonlogger.json import JsonFormatter

from shard import dist
from shard.config import CUDA_GRAPH_SIZES, ShardConfig, default_cache_dir


def _batch_sizes(text: str) -> tuple[int, ...]:
    """ "1,2,4" -> (1, 2, 4); "0" -> ()."""
    try:
        sizes = tuple(sorted({int(x) for x in text.split(",") if x.strip()}))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated batch sizes, got {text!r}") from None
    if sizes == (0,):
        return ()
    if not sizes or sizes[0] < 1:
        raise argparse.ArgumentTypeError(f"batch sizes must be positive (or 0 alone), got {text!r}")
    return sizes


def parse_args(argv: list[str] | None = None) -> ShardConfig:
    p = argparse.ArgumentParser(prog="sluice-shard", description=__doc__)
    p.add_argument("--model-id", type=Path, required=True, help="model directory (config.json + safetensors)")
    p.add_argument("--rank", type=int, default=0)
    p.add_argument("--world-size", type=int, default=1)
    p.add_argument("--master-addr", default="127.0.0.1")
    p.add_argument("--master-port", type=int, default=29500)
    p.add_argument("--uds-path", default="/tmp/sluice-shard", help="listen on {uds-path}-{rank}")
    p.add_argument("--port", type=int, default=None, help="listen on TCP instead of a unix socket")
    p.add_argument("--host", default="127.0.0.1", help="TCP address to bind with --port")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"])
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--cuda-memory-fraction", type=float, default=0.9)
    p.add_argument("--cpu-kv-cache-gb", type=float, default=4.0)
    p.add_argument(
        "--cpu-gemm",
        default="onednn",
        choices=["onednn", "aten"],
        help="CPU linear layers: oneDNN with weights packed at load, or F.linear (MKL)",
    )
    p.add_argument(
        "--enforce-eager", action="store_true", help="run the model eagerly (no torch.compile on CPU, no CUDA graphs)"
    )
    p.add_argument(
        "--cuda-graphs",
        type=_batch_sizes,
        default=CUDA_GRAPH_SIZES,
        help="decode batch sizes captured as CUDA graphs, comma-separated (0: none)",
    )
    p.add_argument(
        "--compile-cache-dir",
        type=Path,
        default=default_cache_dir(),
        help="compiled CPU kernels and Inductor graphs, reused across restarts",
    )
    p.add_argument("--watermark-gamma", type=float, default=0.5)
    p.add_argument("--watermark-delta", type=float, default=2.0)
    p.add_argument("--otlp-endpoint", default=None, help="OTLP/gRPC endpoint for traces (none: no tracing)")
    p.add_argument("--otlp-service-name", default="sluice")
    p.add_argument("--json-output", action="store_true")
    a = p.parse_args(argv)
    handler = logging.StreamHandler()
    handler.setFormatter(
        JsonFormatter(
            "%(asctime)s %(levelname)s %(name)s %(message)s",
            rename_fields={"asctime": "time", "levelname": "level", "name": "target"},
            static_fields={"process": f"shard-{a.rank}"},
        )
        if a.json_output
        else logging.Formatter(f"%(asctime)s %(levelname)s shard-{a.rank} %(name)s: %(message)s")
    )
    logging.basicConfig(level=logging.INFO, handlers=[handler])
    return ShardConfig(
        model_dir=a.model_id,
        rank=a.rank,
        world_size=a.world_size,
        master_addr=a.master_addr,
        master_port=a.master_port,
        uds_path=a.uds_path,
        port=a.port,
        host=a.host,
        device=a.device,
        dtype=a.dtype,
        block_size=a.block_size,
        cuda_memory_fraction=a.cuda_memory_fraction,
        cpu_kv_cache_bytes=int(a.cpu_kv_cache_gb * (1 << 30)),
        cpu_gemm=a.cpu_gemm,
        enforce_eager=a.enforce_eager,
        cuda_graphs=() if a.enforce_eager else a.cuda_graphs,
        compile_cache_dir=a.compile_cache_dir,
        otlp_endpoint=a.otlp_endpoint,
        otlp_service_name=a.otlp_service_name,
        watermark_gamma=a.watermark_gamma,
        watermark_delta=a.watermark_delta,
    )


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
