"""`sluice-router`: the HTTP front end. Connects to the shards, sizes the KV pool, serves."""

import argparse
import asyncio
import functools
import logging
import signal

from aiohttp import web
from pythonjsonlogger.json import JsonFormatter

import configflags
from router.config import RouterConfig
from router.core.engine import Engine
from router.core.kv_cache_manager import KVCacheManager, max_blocks_held
from router.core.scheduler import Scheduler, SchedulerConfig
from router.core.shard_client import ModelInfo, ShardedClient, WarmupSpec
from router.core.shard_setup import connect, reconnect, until_serving
from router.http.app import build_app
from router.http.state import ServerState
from router.limits import Limits, ValidationLimits, check_pool, resolve_limits
from router.metrics import Metrics
from router.tokenizer import Tokenizer
from router.tracing import setup_tracing

log = logging.getLogger("router")


def parse_args(argv: list[str] | None = None) -> RouterConfig:
    """The router's config from its flags (derived from RouterConfig) and $API_KEY, and its logging set up."""
    p = argparse.ArgumentParser(prog="sluice-router", description=__doc__)
    configflags.add_arguments(p, RouterConfig)
    a = p.parse_args(argv)
    config = configflags.build(RouterConfig, a, p, model_id=a.model_id.name)
    handler = logging.StreamHandler()
    handler.setFormatter(
        JsonFormatter(
            "%(asctime)s %(levelname)s %(name)s %(message)s",
            rename_fields={"asctime": "time", "levelname": "level", "name": "target"},
            static_fields={"process": "router"},
        )
        if config.json_output
        else logging.Formatter("%(asctime)s %(levelname)s router %(name)s: %(message)s")
    )
    logging.basicConfig(level=logging.INFO, handlers=[handler])
    return config


async def _bring_up(shards: ShardedClient, config: RouterConfig) -> tuple[ModelInfo, Limits, WarmupSpec, int]:
    """Connect to the shards, derive the limits from the model, warm the shards up and size the KV
    pool: (the model's facts, the limits, what warmup was asked, the number of KV blocks)."""
    info = await connect(shards, config.shard_connect_timeout_s)
    try:
        limits = resolve_limits(config, info.max_position_embeddings)
        max_blocks = (config.max_batch_total_tokens or 0) // info.block_size
        warmup = WarmupSpec(limits.max_batch_prefill_tokens, config.max_batch_size, max_blocks)
        num_blocks = await shards.warmup(warmup)
        bs = info.block_size
        held = max_blocks_held(limits.max_total_tokens, limits.max_batch_prefill_tokens, bs, info.sliding_window)
        if info.is_encoder_decoder:  # the encoder's blocks and the decoder's (its start token, then the output)
            held = -(-(limits.max_total_tokens + 1) // bs) + 1
        check_pool(limits, num_blocks * bs, min(limits.max_total_tokens, held * bs))
    except ValueError as e:
        raise SystemExit(str(e)) from None
    return info, limits, warmup, num_blocks


async def _serve(config: RouterConfig) -> None:
    provider = setup_tracing(f"{config.otlp_service_name}.router", config.otlp_endpoint)
    tokenizer = Tokenizer(config.model_dir)
    shards = ShardedClient(list(config.shard_addresses))
    loop = asyncio.get_running_loop()
    engines: list[Engine] = []  # the engine, once built: SIGUSR1 may come during the first warmup
    loop.add_signal_handler(signal.SIGUSR1, _on_shards_restarting, engines)
    if config.await_shard_restart:  # a shard that dies during warmup is restarted: try again
        bring_up = until_serving(shards, lambda: _bring_up(shards, config), config.shard_connect_timeout_s)
    else:
        bring_up = _bring_up(shards, config)
    info, limits, warmup, num_blocks = await bring_up
    max_input, max_total, prefill_budget = (
        limits.max_input_tokens,
        limits.max_total_tokens,
        limits.max_batch_prefill_tokens,
    )
    log.info(
        "model %s (%s, %s on %s, %d shard(s)); KV cache: %d tokens%s; limits: input %d, total %d, prefill %d",
        config.model_id,
        info.architecture,
        info.dtype,
        info.device_type,
        info.world_size,
        num_blocks * info.block_size,
        f" (sliding window of {info.sliding_window}: blocks behind it are freed)" if info.sliding_window else "",
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
        # An encoder-decoder model's decoder K/V depend on the encoder's input: no prefix is shared.
        KVCacheManager(
            num_blocks, info.block_size, config.prefix_caching and not info.is_encoder_decoder, info.sliding_window
        ),
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
        max_steps_in_flight=3 if config.overlap_steps else 1,  # see Engine.run
        reconnect=(
            functools.partial(reconnect, shards, info, warmup, config.shard_connect_timeout_s)
            if config.await_shard_restart
            else None
        ),
        decoder_start_token_id=info.decoder_start_token_id if info.is_encoder_decoder else None,
    )
    engines.append(engine)
    limits = ValidationLimits(
        config.max_best_of,
        config.max_stop_sequences,
        config.max_top_n_tokens,
        max_input,
        max_total,
        config.max_client_batch_size,
        info.is_encoder_decoder,
    )
    state = ServerState(
        engine, shards, tokenizer, limits, info, config.model_id, config.max_concurrent_requests, metrics
    )
    app = build_app(state, config.payload_limit, config.api_key, config.cors_allow_origins)

    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, _on_stop_signal, stop, engine)
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
    # Requests still running when the drain ends get an error event (or a 424), not a cut connection.
    drain_end = loop.call_later(
        max(0.0, config.graceful_termination_timeout_s - 1.0), engine.abort_all, "the server is shutting down"
    )
    await runner.cleanup()
    drain_end.cancel()
    if engine_task.done() and not engine_task.cancelled():
        await shards.close()
        raise SystemExit(f"the batching loop stopped: {engine_task.exception()!r}")
    engine_task.cancel()
    await shards.close()
    if provider is not None:
        provider.shutdown()  # flush the last spans


def _on_shards_restarting(engines: list[Engine]) -> None:
    """SIGUSR1, from the launcher: it is restarting the shard group. The engine waits for the new group
    (with --await-shard-restart); during the first warmup, the bring-up retries by itself."""
    log.warning("the launcher is restarting the shards")
    for engine in engines:
        engine.shards_restarting()


def _on_stop_signal(stop: asyncio.Event, engine: Engine) -> None:
    """SIGTERM or SIGINT: the first drains (requests in flight may finish, no new connection is
    accepted; lost shards are no longer waited for); the second ends every request now, each
    client getting an error event or a 424."""
    if not stop.is_set():
        log.info("stopping: draining the requests in flight (a second signal ends them now)")
        engine.stop_resuming()
        stop.set()
        return
    log.warning("stopping now: ending %d request(s) in flight with an error", engine.num_requests)
    engine.abort_all("the server is shutting down")


def main(argv: list[str] | None = None) -> None:
    asyncio.run(_serve(parse_args(argv)))
