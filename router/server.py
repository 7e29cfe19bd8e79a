"""aiohttp routes: HTTP <-> validated requests and engine events. Translation only."""

import asyncio
import contextlib
import dataclasses
import importlib.metadata
import itertools
import json
import logging
import random
import re
import time
from dataclasses import dataclass

from aiohttp import web

from router.core.engine import Engine, GenerationError, Timings, TokenEvent
from router.core.request import GenerationRequest, SamplingParams
from router.metrics import Metrics
from router.middleware import (
    Overloaded,
    add_cors,
    api_key_middleware,
    concurrency_middleware,
    error_middleware,
    error_response,
    tracing_middleware,
)
from router.responses import error_json, generate_json, stream_json
from router.shard_client import ModelInfo, ShardedClient, ShardError
from router.tokenizer import Tokenizer
from router.validation import ValidationError, ValidationLimits, ValidRequest, check_input_length, validate

log = logging.getLogger(__name__)
__version__ = importlib.metadata.version("sluice")


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


# A JSON escape of a UTF-16 surrogate: the only way (with raw surrogate bytes) to put a lone one in a string.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


def parse_json(raw: bytes) -> object:
    """`raw` as JSON, refusing what `json` accepts but no tokenizer or client can use (ValueError):
    nesting deeper than the interpreter's recursion limit, and lone UTF-16 surrogates (`"\\ud800"`),
    which cannot be encoded as UTF-8 (serde_json, and so TGI, refuses both)."""
    try:
        body = json.loads(raw)
    except RecursionError:
        raise ValueError("nested too deeply") from None
    if not raw.isascii() or _SURROGATE_ESCAPE.search(raw):
        try:
            json.dumps(body, ensure_ascii=False).encode()
        except UnicodeEncodeError:
            raise ValueError("lone Unicode surrogate in a string") from None
        except RecursionError:
            raise ValueError("nested too deeply") from None
    return body


def is_json_content_type(content_type: str) -> bool:
    """`application/json` or a `+json` suffix type (parameters such as charset aside), as TGI's axum accepts."""
    return content_type == "application/json" or (
        content_type.startswith("application/") and content_type.endswith("+json")
    )


async def _json_body(request: web.Request) -> object:
    if not is_json_content_type(request.content_type):
        # A browser sends text/plain or form posts cross-origin without a CORS preflight: refusing
        # every other type keeps such pages from driving the API with a visitor's credentials.
        raise web.HTTPUnsupportedMediaType(
            text=json.dumps(
                error_json("Expected request with `Content-Type: application/json`", "unsupported_media_type")
            ),
            content_type="application/json",
        )
    try:
        return parse_json(await request.read())
    except ValueError as e:  # UnicodeDecodeError included
        raise web.HTTPBadRequest(
            text=json.dumps(error_json(f"Malformed JSON: {e}", "bad_request")), content_type="application/json"
        ) from None


async def _validated(request: web.Request, stream: bool) -> tuple[ValidRequest, float]:
    start = time.monotonic()
    body = await _json_body(request)
    state = request.app[STATE]
    return await asyncio.to_thread(validate, body, state.tokenizer, state.limits, stream=stream), start


def _seed(valid: ValidRequest) -> int | None:
    return valid.sampling.seed if valid.is_seeded else None


async def _run(engine: Engine, valid: ValidRequest, timings: Timings) -> list[TokenEvent]:
    async with contextlib.aclosing(engine.generate(valid.generation(), timings)) as events:
        return [e async for e in events]


async def _generate(request: web.Request) -> tuple[dict, dict[str, str]]:
    """Run one request to completion: (GenerateResponse JSON, timing headers).

    With best_of > 1, that many sequences are sampled concurrently with their own seeds and
    the one with the highest mean token logprob is returned; the others go in
    `details.best_of_sequences`.
    """
    valid, start = await _validated(request, stream=False)
    state = request.app[STATE]
    engine = state.engine
    if valid.best_of > 1 and engine.num_requests + valid.best_of > state.max_concurrent_requests:
        raise Overloaded()  # the middleware holds one slot; each sequence counts, as the OpenAI routes' choices
    candidates = [valid] + [
        dataclasses.replace(valid, sampling=dataclasses.replace(valid.sampling, seed=random.getrandbits(64)))
        for _ in range(valid.best_of - 1)
    ]
    timings = [Timings(queued_s=time.monotonic(), start_s=start) for _ in candidates]
    tasks = [asyncio.ensure_future(_run(engine, v, t)) for v, t in zip(candidates, timings)]
    try:
        runs = await asyncio.gather(*tasks)
    except BaseException:  # one sequence failed: the others (best_of) would run on for nobody
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise
    best = max(range(len(runs)), key=lambda i: sum(e.token.logprob for e in runs[i]) / len(runs[i]))
    prefix = valid.inputs if valid.return_full_text else ""
    details = valid.details or valid.decoder_input_details  # TGI builds details for either
    body = generate_json(runs[best], prefix, details, _seed(candidates[best]))
    if valid.best_of > 1 and details:
        body["details"]["best_of_sequences"] = [
            {
                "generated_text": prefix + runs[i][-1].generated_text,
                **generate_json(runs[i], "", True, _seed(v))["details"],
            }
            for i, v in enumerate(candidates)
            if i != best
        ]
    return body, _timing_headers(valid, start, timings[best], len(runs[best]))


async def generate(request: web.Request) -> web.Response:
    body, headers = await _generate(request)
    return web.json_response(body, headers=headers)


async def compat_generate(request: web.Request) -> web.StreamResponse:
    """POST /: `stream: true` streams, otherwise a JSON array with one response."""
    body = await _json_body(request)
    if isinstance(body, dict) and body.get("stream") is True:
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
    events = request.app[STATE].engine.generate(valid.generation(), Timings(queued_s=time.monotonic(), start_s=start))
    try:
        async with contextlib.aclosing(events):  # leaving early (client gone) aborts the request at once
            async for event in events:
                index += 1
                body = stream_json(index, event, prefix, valid.details, _seed(valid), len(valid.input_ids))
                await response.write(b"data:" + json.dumps(body).encode() + b"\n\n")
    except GenerationError as e:
        await response.write(b"data:" + json.dumps(error_json(str(e), "generation")).encode() + b"\n\n")
    except ConnectionError:
        raise  # the client went away
    except Exception:  # a bug: the stream already started, so the client gets an error event, not a cut
        log.exception("stream failed on %s", request.path)
        await response.write(b"data:" + json.dumps(error_json("Internal server error", "internal")).encode() + b"\n\n")
    await response.write_eof()
    return response


HEALTH_PROBE_TIMEOUT_S = 10.0
_HEALTH_PROBE = web.AppKey("health_probe", asyncio.Lock)


async def health(request: web.Request) -> web.Response:
    """200 while the shards answer; after a failed step whose reset failed too, only once a
    generation succeeds again. As TGI does, /health then runs a one-token generation itself:
    without it, a server that load balancers stop sending requests to (503) would stay unhealthy."""
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
    body = await _json_body(request)
    inputs = body.get("inputs") if isinstance(body, dict) else None
    if not isinstance(inputs, str) or not inputs:
        raise ValidationError("`inputs` must be a non-empty string")
    state = request.app[STATE]
    check_input_length(inputs, state.limits)  # before the tokenizer's work, as for generation
    text = await asyncio.to_thread(lambda: json.dumps(_tokens_json(state.tokenizer, inputs)))
    return web.Response(text=text, content_type="application/json")


def _tokens_json(tokenizer: Tokenizer, inputs: str) -> list[dict]:
    """[{id, text, start, stop}] with byte offsets, in time linear in `inputs` (run in a thread
    with its serialization: a long text has hundreds of thousands of tokens)."""
    ids, offsets = tokenizer.encode_with_offsets(inputs)
    utf8_len = (1 if c < "\x80" else 2 if c < "\u0800" else 3 if c < "\U00010000" else 4 for c in inputs)
    byte_offset = [0, *itertools.accumulate(utf8_len)]  # by character offset
    return [
        {"id": i, "text": inputs[start:stop], "start": byte_offset[start], "stop": byte_offset[stop]}
        for i, (start, stop) in zip(ids, offsets)
    ]


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
            "max_client_batch_size": s.limits.max_client_batch_size,
            "router": "sluice-router",
            "version": __version__,
            "sha": None,
            "docker_label": None,
        }
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
    app.router.add_post("/generate", generate)
    app.router.add_post("/generate_stream", generate_stream)
    app.router.add_post("/", compat_generate)
    app.router.add_post("/tokenize", tokenize)
    app.router.add_get("/health", health)
    app.router.add_get("/info", info)
    app.router.add_get("/metrics", metrics)
    from router.openai_api import add_openai_routes  # imported here: it imports this module
    from router.openapi import add_openapi_routes  # likewise

    add_openai_routes(app)
    add_openapi_routes(app)
    return app
