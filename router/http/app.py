"""The aiohttp app: middleware, the TGI, OpenAI and documentation routes, and the shared ones
(/health, /info, /metrics, /tokenize). Translation only: the engine does the work."""

import asyncio
import contextlib
import itertools
import logging
import time

from aiohttp import web

from router.core.engine import GenerationError, Timings
from router.core.request import GenerationRequest, SamplingParams
from router.core.shard_client import ShardError
from router.http.middleware import (
    add_cors,
    api_key_middleware,
    concurrency_middleware,
    error_middleware,
    tracing_middleware,
)
from router.http.openai.routes import add_openai_routes
from router.http.openapi import add_openapi_routes
from router.http.protocol import parse
from router.http.responses import error_response, model_response
from router.http.state import STATE, ServerState, json_body
from router.http.tgi.protocol import TokenizeRequest, check_input_length
from router.http.tgi.responses import Info, TokenizedToken, TokenizeResponse
from router.http.tgi.routes import add_tgi_routes
from router.tokenizer import Tokenizer
from router.version import VERSION

log = logging.getLogger(__name__)

HEALTH_PROBE_TIMEOUT_S = 10.0
_HEALTH_PROBE = web.AppKey("health_probe", asyncio.Lock)


async def health(request: web.Request) -> web.Response:
    """200 while the shards answer; 503 while they are being restarted, and after a failed step
    whose reset failed too, until a generation succeeds again. As TGI does, /health then runs a
    one-token generation itself: without it, a server that load balancers stop sending requests to
    (503) would stay unhealthy. The readiness probe."""
    state = request.app[STATE]
    if state.engine.recovering:
        return error_response(503, "the shards are restarting", "healthcheck")
    return await _shards_health(request)


async def live(request: web.Request) -> web.Response:
    """The liveness probe: as /health, but 200 while the shards are being restarted. The launcher
    bounds a restart (it exits when it gives up, as the router does when the shards do not come
    back in time), so a restart in progress is no reason to kill the server; stuck shards are."""
    if request.app[STATE].engine.recovering:
        return web.Response(status=200)
    return await _shards_health(request)


async def _shards_health(request: web.Request) -> web.Response:
    state = request.app[STATE]
    try:
        await state.shards.health()
        if not state.engine.is_healthy:
            await _probe_generation(request.app)
    except (TimeoutError, ShardError, GenerationError) as e:
        log.warning("health check failed: %s", e)
        return error_response(503, "unhealthy", "healthcheck")
    return web.Response(status=200)


async def _probe_generation(app: web.Application) -> None:
    """One token for a one-token prompt through the engine (one probe at a time); raises unless the
    engine is healthy afterwards. Counted in the engine's metrics like any request."""
    state = app[STATE]
    async with app[_HEALTH_PROBE]:
        if state.engine.is_healthy:  # a request or another probe succeeded meanwhile
            return
        probe = GenerationRequest(
            state.tokenizer.encode("Hi", add_special_tokens=False)[:1] or [0], SamplingParams(), 1
        )
        async with asyncio.timeout(HEALTH_PROBE_TIMEOUT_S):
            async with contextlib.aclosing(state.engine.generate(probe, Timings(queued_s=time.monotonic()))) as events:
                async for _ in events:
                    pass
    if not state.engine.is_healthy:
        raise ShardError("the last step failed and the shards could not be reset")


async def tokenize(request: web.Request) -> web.Response:
    """TGI's /tokenize: [{id, text, start, stop}] with byte offsets into `inputs`."""
    inputs = parse(TokenizeRequest, await json_body(request)).inputs
    state = request.app[STATE]
    check_input_length(inputs, state.limits)  # before the tokenizer's work, as for generation
    return model_response(await asyncio.to_thread(_tokens, state.tokenizer, inputs))


def _tokens(tokenizer: Tokenizer, inputs: str) -> TokenizeResponse:
    """The tokens with byte offsets, in time linear in `inputs` (run in a thread: a long text has
    hundreds of thousands of tokens)."""
    ids, offsets = tokenizer.encode_with_offsets(inputs)
    utf8_len = (1 if c < "\x80" else 2 if c < "\u0800" else 3 if c < "\U00010000" else 4 for c in inputs)
    byte_offset = [0, *itertools.accumulate(utf8_len)]  # by character offset
    return TokenizeResponse(
        [
            TokenizedToken(id=i, text=inputs[start:stop], start=byte_offset[start], stop=byte_offset[stop])
            for i, (start, stop) in zip(ids, offsets)
        ]
    )


async def metrics(request: web.Request) -> web.Response:
    s = request.app[STATE]
    return web.Response(body=s.metrics.render(), content_type="text/plain", charset="utf-8")


async def info(request: web.Request) -> web.Response:
    s = request.app[STATE]
    return model_response(
        Info(
            model_id=s.model_id,
            model_dtype=s.model_info.dtype,
            model_device_type=s.model_info.device_type,
            quantize=s.model_info.quantize,
            model_weight_bytes=s.model_info.weight_bytes,
            max_concurrent_requests=s.max_concurrent_requests,
            max_best_of=s.limits.max_best_of,
            max_stop_sequences=s.limits.max_stop_sequences,
            max_input_tokens=s.limits.max_input_tokens,
            max_total_tokens=s.limits.max_total_tokens,
            max_client_batch_size=s.limits.max_client_batch_size,
            version=VERSION,
        )
    )


def build_app(
    state: ServerState, payload_limit: int, api_key: str | None = None, cors_allow_origins: tuple[str, ...] = ()
) -> web.Application:
    middlewares = [tracing_middleware, error_middleware(state.metrics)]
    if api_key:
        middlewares.append(api_key_middleware(api_key))
    middlewares.append(concurrency_middleware(state.max_concurrent_requests))
    app = web.Application(middlewares=middlewares, client_max_size=payload_limit)
    add_cors(app, cors_allow_origins)
    app[STATE] = state
    app[_HEALTH_PROBE] = asyncio.Lock()
    add_tgi_routes(app)
    app.router.add_post("/tokenize", tokenize)
    app.router.add_get("/health", health)
    app.router.add_get("/live", live)
    app.router.add_get("/info", info)
    app.router.add_get("/metrics", metrics)
    add_openai_routes(app)
    add_openapi_routes(app)
    return app
