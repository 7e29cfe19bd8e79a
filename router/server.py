"""aiohttp routes: HTTP <-> validated requests and engine events. Translation only."""

import asyncio
import json
import logging
import time
from dataclasses import dataclass

from aiohttp import web

from router.engine import Engine, GenerationError, Timings, TokenEvent
from router.metrics import Metrics
from router.responses import error_json, generate_json, stream_json
from router.shard_client import ModelInfo, ShardedClient, ShardError
from router.tokenizer import Tokenizer
from router.validation import ValidationError, ValidationLimits, ValidRequest, validate

log = logging.getLogger(__name__)


class Overloaded(Exception):
    pass


@dataclass(frozen=True, slots=True)
class ServerState:
    engine: Engine
    shards: ShardedClient
    tokenizer: Tokenizer
    limits: ValidationLimits
    model_info: ModelInfo
    model_id: str
    max_concurrent_requests: int
    metrics: Metrics


STATE = web.AppKey("state", ServerState)


def _error(status: int, message: str, error_type: str) -> web.Response:
    return web.json_response(error_json(message, error_type), status=status)


GENERATION_ROUTES = frozenset({"/", "/generate", "/generate_stream", "/v1/chat/completions", "/v1/completions"})


@web.middleware
async def error_middleware(request: web.Request, handler):
    """Maps exceptions to TGI's error JSON and status codes; counts requests and failures."""
    is_generation = request.method == "POST" and request.path in GENERATION_ROUTES
    metrics = request.app[STATE].metrics
    if is_generation:
        metrics.request_count.inc()
    try:
        return await handler(request)
    except ValidationError as e:
        metrics.request_failure.labels("validation").inc()
        return _error(422, f"Input validation error: {e}", "validation")
    except Overloaded:
        metrics.request_failure.labels("overloaded").inc()
        return _error(429, "Model is overloaded", "overloaded")
    except GenerationError as e:  # counted by the engine
        return _error(424, str(e), "generation")
    except web.HTTPException as e:
        if e.status < 400 or e.content_type == "application/json":
            raise
        return _error(e.status, e.reason, "bad_request" if e.status != 413 else "payload_too_large")
    except Exception:
        log.exception("unhandled error on %s", request.path)
        return _error(500, "Internal server error", "internal")


async def _json_body(request: web.Request) -> object:
    try:
        return json.loads(await request.read())
    except (ValueError, UnicodeDecodeError) as e:
        raise web.HTTPBadRequest(
            text=json.dumps(error_json(f"Malformed JSON: {e}", "bad_request")), content_type="application/json"
        ) from None


async def _validated(request: web.Request, stream: bool) -> tuple[ValidRequest, float]:
    start = time.monotonic()
    body = await _json_body(request)
    state = request.app[STATE]
    if state.engine.num_requests >= state.max_concurrent_requests:
        raise Overloaded()
    return await asyncio.to_thread(validate, body, state.tokenizer, state.limits, stream=stream), start


def _seed(valid: ValidRequest) -> int | None:
    return valid.sampling.seed if valid.is_seeded else None


async def _generate(request: web.Request) -> tuple[dict, dict[str, str]]:
    """Run one request to completion: (GenerateResponse JSON, timing headers)."""
    valid, start = await _validated(request, stream=False)
    timings = Timings(queued_s=time.monotonic(), start_s=start)
    events: list[TokenEvent] = [e async for e in request.app[STATE].engine.generate(valid, timings)]
    body = generate_json(events, valid.inputs if valid.return_full_text else "", valid.details, _seed(valid))
    return body, _timing_headers(valid, start, timings, len(events))


async def generate(request: web.Request) -> web.Response:
    body, headers = await _generate(request)
    return web.json_response(body, headers=headers)


async def compat_generate(request: web.Request) -> web.StreamResponse:
    """POST /: `stream: true` streams, otherwise a JSON array with one response."""
    body = await _json_body(request)
    if isinstance(body, dict) and body.get("stream"):
        return await generate_stream(request)
    body, headers = await _generate(request)
    return web.json_response([body], headers=headers)


def _timing_headers(valid: ValidRequest, start: float, timings: Timings, num_generated: int) -> dict[str, str]:
    end = time.monotonic()
    batched = timings.batched_s or end
    inference_ms = int((end - batched) * 1000)
    return {
        "x-compute-type": "sluice",
        "x-compute-time": f"{end - start:.6f}",
        "x-compute-characters": str(len(valid.inputs)),
        "x-total-time": str(int((end - start) * 1000)),
        "x-validation-time": str(int((timings.queued_s - start) * 1000)),
        "x-queue-time": str(int((batched - timings.queued_s) * 1000)),
        "x-inference-time": str(inference_ms),
        "x-time-per-token": str(inference_ms // max(num_generated, 1)),
        "x-prompt-tokens": str(len(valid.input_ids)),
        "x-generated-tokens": str(num_generated),
    }


async def generate_stream(request: web.Request) -> web.StreamResponse:
    """SSE: one event per token; errors after the stream started arrive as an error event."""
    valid, start = await _validated(request, stream=True)
    response = web.StreamResponse(
        headers={
            "Content-Type": "text/event-stream",
            "Cache-Control": "no-cache",
            "X-Accel-Buffering": "no",
            "x-compute-type": "sluice",
            "x-compute-characters": str(len(valid.inputs)),
        }
    )
    await response.prepare(request)
    prefix = valid.inputs if valid.return_full_text else ""
    index = 0
    try:
        async for event in request.app[STATE].engine.generate(valid, Timings(queued_s=time.monotonic(), start_s=start)):
            index += 1
            body = stream_json(index, event, prefix, valid.details, _seed(valid), len(valid.input_ids))
            await response.write(b"data:" + json.dumps(body).encode() + b"\n\n")
    except GenerationError as e:
        await response.write(b"data:" + json.dumps(error_json(str(e), "generation")).encode() + b"\n\n")
    await response.write_eof()
    return response


async def health(request: web.Request) -> web.Response:
    try:
        await request.app[STATE].shards.health()
    except (TimeoutError, ShardError) as e:
        log.warning("health check failed: %s", e)
        return _error(503, "unhealthy", "healthcheck")
    return web.Response(status=200)


async def metrics(request: web.Request) -> web.Response:
    s = request.app[STATE]
    s.metrics.kv_blocks_free.set(s.engine.scheduler.block_manager.num_free_blocks)
    return web.Response(body=s.metrics.render(), content_type="text/plain", charset="utf-8")


async def info(request: web.Request) -> web.Response:
    s = request.app[STATE]
    return web.json_response(
        {
            "model_id": s.model_id,
            "model_sha": None,
            "model_dtype": s.model_info.dtype,
            "model_device_type": s.model_info.device_type,
            "model_pipeline_tag": "text-generation",
            "max_concurrent_requests": s.max_concurrent_requests,
            "max_best_of": s.limits.max_best_of,
            "max_stop_sequences": s.limits.max_stop_sequences,
            "max_input_tokens": s.limits.max_input_tokens,
            "max_total_tokens": s.limits.max_total_tokens,
            "validation_workers": 1,
            "max_client_batch_size": 1,
            "router": "sluice-router",
            "version": "0.1.0",
            "sha": None,
            "docker_label": None,
        }
    )


def build_app(state: ServerState, payload_limit: int) -> web.Application:
    app = web.Application(middlewares=[error_middleware], client_max_size=payload_limit)
    app[STATE] = state
    app.router.add_post("/generate", generate)
    app.router.add_post("/generate_stream", generate_stream)
    app.router.add_post("/", compat_generate)
    app.router.add_get("/health", health)
    app.router.add_get("/info", info)
    app.router.add_get("/metrics", metrics)
    return app
