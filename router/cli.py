"""`sluice-router`: the HTTP front end. Connects to the shards, sizes the KV pool, serves."""

import argparse
import asyncio
import logging
import os
import signal
from pathlib import Path

from aiohttp import web
from pythonjsonlogger.json import JsonFormatter

from router.config import RouterConfig
from router.core.engine import Engine
from router.core.kv_cache_manager import KVCacheManager
from router.core.scheduler import Scheduler, SchedulerConfig
from router.core.shard_client import ShardedClient
from router.http.app import build_app
from router.http.state import ServerState
from router.limits import ValidationLimits, check_pool, resolve_limits
from router.metrics import Metrics
from router.tokenizer import Tokenizer
from router.tracing import setup_tracing

log = logging.getLogger("router")


def parse_args(argv: list[str] | None = None) -> RouterConfig:
    p = argparse.ArgumentParser(prog="sluice-router", description=__doc__)
    p.add_argument("--model-id", type=Path, required=True, help="model directory (tokenizer files)")
    p.add_argument(
        "--shard",
        action="append",
        dest="shards",
        required=True,
        help="gRPC address of a shard, once per rank in rank order (unix:///path or host:port)",
    )
    p.add_argument("--hostname", default="0.0.0.0")
    p.add_argument("--port", type=int, default=3000)
    p.add_argument("--max-concurrent-requests", type=int, default=128)
    p.add_argument("--max-best-of", type=int, default=2)
    p.add_argument("--max-stop-sequences", type=int, default=4)
    p.add_argument("--max-top-n-tokens", type=int, default=5)
    p.add_argument("--max-client-batch-size", type=int, default=4, help="prompts per /v1/completions request")
    p.add_argument("--max-input-tokens", type=int)
    p.add_argument("--max-total-tokens", type=int)
    p.add_argument("--max-batch-prefill-tokens", type=int)
    p.add_argument("--max-batch-size", type=int, default=256)
    p.add_argument(
        "--prefix-caching",
        type=lambda v: v.lower() in ("1", "true", "yes", "on"),
        default=True,
        help="reuse the KV blocks of shared prompt prefixes (true/false)",
    )
    p.add_argument(
        "--overlap-steps",
        type=lambda v: v.lower() in ("1", "true", "yes", "on"),
        default=True,
        help="prepare the next step while the shards compute the current one (true/false)",
    )
    p.add_argument("--max-batch-total-tokens", type=int, help="cap on the KV cache in tokens (default: what fits)")
    p.add_argument("--waiting-served-ratio", type=float, default=0.0, help="see SchedulerConfig")
    p.add_argument("--max-waiting-tokens", type=int, default=20, help="see SchedulerConfig")
    p.add_argument(
        "--max-prefill-slowdown",
        type=float,
        default=2.0,
        help="while requests decode, a long prompt's chunks may make a step at most this many times as long (0: off)",
    )
    p.add_argument(
        "--long-prompt-tokens",
        type=int,
        default=512,
        help="prompts longer than this are chunked under --max-prefill-slowdown; shorter ones go in whole",
    )
    p.add_argument("--payload-limit", type=int, default=2_000_000)
    p.add_argument("--graceful-termination-timeout", type=float, default=90.0)
    p.add_argument("--step-timeout", type=float, default=120.0, help="seconds a step may take (0: no limit)")
    p.add_argument(
        "--api-key",
        default=os.environ.get("API_KEY"),
        help="require `Authorization: Bearer KEY` on generation routes (default: $API_KEY, which keeps it out of argv)",
    )
    p.add_argument("--cors-allow-origin", action="append", default=[], help="allowed origin (repeatable; none: any)")
    p.add_argument("--otlp-endpoint", default=None, help="OTLP/gRPC endpoint for traces (none: no tracing)")
    p.add_argument("--otlp-service-name", default="sluice")
    p.add_argument("--json-output", action="store_true")
    a = p.parse_args(argv)
    handler = logging.StreamHandler()
    handler.setFormatter(
        JsonFormatter(
            "%(asctime)s %(levelname)s %(name)s %(message)s",
            rename_fields={"asctime": "time", "levelname": "level", "name": "target"},
            static_fields={"process": "router"},
        )
        if a.json_output
        else logging.Formatter("%(asctime)s %(levelname)s router %(name)s: %(message)s")
    )
    logging.basicConfig(level=logging.INFO, handlers=[handler])
    return RouterConfig(
        model_dir=a.model_id,
        shard_addresses=tuple(a.shards),
        model_id=a.model_id.name,
        hostname=a.hostname,
        port=a.port,
        max_concurrent_requests=a.max_concurrent_requests,
        max_best_of=a.max_best_of,
        max_stop_sequences=a.max_stop_sequences,
        max_top_n_tokens=a.max_top_n_tokens,
        max_client_batch_size=a.max_client_batch_size,
        max_input_tokens=a.max_input_tokens,
        max_total_tokens=a.max_total_tokens,
        max_batch_prefill_tokens=a.max_batch_prefill_tokens,
        max_batch_size=a.max_batch_size,
        max_batch_total_tokens=a.max_batch_total_tokens,
        waiting_served_ratio=a.waiting_served_ratio,
        max_waiting_tokens=a.max_waiting_tokens,
        max_prefill_slowdown=a.max_prefill_slowdown,
        long_prompt_tokens=a.long_prompt_tokens,
        prefix_caching=a.prefix_caching,
        overlap_steps=a.overlap_steps,
        payload_limit=a.payload_limit,
        graceful_termination_timeout_s=a.graceful_termination_timeout,
        step_timeout_s=a.step_timeout or None,
        api_key=a.api_key,
        otlp_endpoint=a.otlp_endpoint,
        otlp_service_name=a.otlp_service_name,
        cors_allow_origins=tuple(a.cors_allow_origin),
    )


async def _serve(config: RouterConfig) -> None:
    provider = setup_tracing(f"{config.otlp_service_name}.router", config.otlp_endpoint)
    tokenizer = Tokenizer(config.model_dir)
    shards = ShardedClient(list(config.shard_addresses))
    await shards.wait_ready(config.shard_connect_timeout_s)
    info = await shards.info()
    await shards.clear_cache()  # a restarted router must not inherit request state

    try:
        limits = resolve_limits(config, info.max_position_embeddings)
        max_blocks = (config.max_batch_total_tokens or 0) // info.block_size
        num_blocks = await shards.warmup(limits.max_batch_prefill_tokens, config.max_batch_size, max_blocks)
        check_pool(limits, num_blocks * info.block_size)
    except ValueError as e:
        raise SystemExit(str(e)) from None
    max_input, max_total, prefill_budget = (
        limits.max_input_tokens,
        limits.max_total_tokens,
        limits.max_batch_prefill_tokens,
    )
    log.info(
        "model %s (%s, %s on %s, %d shard(s)); KV cache: %d tokens; limits: input %d, total %d, prefill %d",
        config.model_id,
        info.architecture,
        info.dtype,
        info.device_type,
        info.world_size,
        num_blocks * info.block_size,
        max_input,
        max_total,
        prefill_budget,
    )

    scheduler = Scheduler(
        SchedulerConfig(
            config.max_batch_size,
            prefill_budget,
            config.waiting_served_ratio,
            config.max_waiting_tokens,
            config.max_prefill_slowdown,
            config.long_prompt_tokens,
        ),
        KVCacheManager(num_blocks, info.block_size, config.prefix_caching),
    )
    metrics = Metrics(max_input, max_total)
    metrics.batch_max_total_tokens.set(num_blocks * info.block_size)
    engine = Engine(
        scheduler,
        shards,
        tokenizer,
        info.eos_token_ids,
        metrics,
        config.step_timeout_s,
        max_steps_in_flight=2 if config.overlap_steps else 1,
    )
    limits = ValidationLimits(
        config.max_best_of,
        config.max_stop_sequences,
        config.max_top_n_tokens,
        max_input,
        max_total,
        config.max_client_batch_size,
    )
    state = ServerState(
        engine, shards, tokenizer, limits, info, config.model_id, config.max_concurrent_requests, metrics
    )
    app = build_app(state, config.payload_limit, config.api_key, config.cors_allow_origins)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    engine_task = asyncio.create_task(engine.run(), name="engine")
    engine_task.add_done_callback(lambda t: stop.set())  # the loop never returns unless it crashed

    # On SIGTERM the site stops accepting connections and in-flight requests get this long to finish.
    # handler_cancellation: a client that goes away cancels its handler, which aborts its request.
    runner = web.AppRunner(
        app, access_log=None, shutdown_timeout=config.graceful_termination_timeout_s, handler_cancellation=True
    )
    await runner.setup()
    await web.TCPSite(runner, config.hostname, config.port).start()
    log.info("serving on http://%s:%d", config.hostname, config.port)
    await stop.wait()
    await runner.cleanup()
    if engine_task.done() and not engine_task.cancelled():
        await shards.close()
        raise SystemExit(f"the batching loop stopped: {engine_task.exception()!r}")
    engine_task.cancel()
    await shards.close()
    if provider is not None:
        provider.shutdown()  # flush the last spans


def main(argv: list[str] | None = None) -> None:
    asyncio.run(_serve(parse_args(argv)))
