"""TGI's generation routes: /generate, /generate_stream and / (compat)."""

import asyncio
import contextlib
import dataclasses
import random
import time

from aiohttp import web

from router.core.engine import Engine, Timings, TokenEvent
from router.http.errors import Overloaded
from router.http.protocol import ErrorResponse, dump
from router.http.responses import model_response
from router.http.sse import open_stream, reporting_failures
from router.http.state import STATE, json_body
from router.http.tgi.protocol import ValidRequest, validate
from router.http.tgi.responses import BestOfSequence, CompatGenerateResponse, GenerateResponse, StreamResponse


async def _validated(request: web.Request, stream: bool) -> tuple[ValidRequest, float]:
    start = time.monotonic()
    body = await json_body(request)
    state = request.app[STATE]
    return await asyncio.to_thread(validate, body, state.tokenizer, state.limits, stream=stream), start


def _seed(valid: ValidRequest) -> int | None:
    return valid.sampling.seed if valid.is_seeded else None


async def _run(engine: Engine, valid: ValidRequest, timings: Timings) -> list[TokenEvent]:
    async with contextlib.aclosing(engine.generate(valid.generation(), timings)) as events:
        return [e async for e in events]


async def _generate(request: web.Request) -> tuple[GenerateResponse, dict[str, str]]:
    """Run one request to completion: (its response, timing headers).

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
    body = GenerateResponse.of(runs[best], prefix, details, _seed(candidates[best]))
    if valid.best_of > 1 and details:
        body.details.best_of_sequences = [
            BestOfSequence(
                generated_text=prefix + runs[i][-1].generated_text,
                **GenerateResponse.of(runs[i], "", True, _seed(v)).details.model_dump(exclude={"best_of_sequences"}),
            )
            for i, v in enumerate(candidates)
            if i != best
        ]
    return body, _timing_headers(valid, start, timings[best], len(runs[best]))


async def generate(request: web.Request) -> web.Response:
    body, headers = await _generate(request)
    return model_response(body, headers=headers)


async def compat_generate(request: web.Request) -> web.StreamResponse:
    """POST /: `stream: true` streams, otherwise a JSON array with one response."""
    body = await json_body(request)
    if isinstance(body, dict) and body.get("stream") is True:
        return await generate_stream(request)
    body, headers = await _generate(request)
    return model_response(CompatGenerateResponse([body]), headers=headers)


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


def _event(body: StreamResponse | ErrorResponse) -> bytes:
    return b"data:" + dump(body).encode() + b"\n\n"


def _error_event(message: str, status: int) -> bytes:
    return _event(ErrorResponse(error=message, error_type="generation" if status == 424 else "internal"))


async def generate_stream(request: web.Request) -> web.StreamResponse:
    """SSE: one event per token; errors after the stream started arrive as an error event."""
    valid, start = await _validated(request, stream=True)
    response = await open_stream(request, {"x-compute-type": "sluice", "x-compute-characters": str(len(valid.inputs))})
    prefix = valid.inputs if valid.return_full_text else ""
    events = request.app[STATE].engine.generate(valid.generation(), Timings(queued_s=time.monotonic(), start_s=start))
    index = 0
    async with reporting_failures(request, response, _error_event):
        async with contextlib.aclosing(events):  # leaving early (client gone) aborts the request at once
            async for event in events:
                index += 1
                body = StreamResponse.of(index, event, prefix, valid.details, _seed(valid), len(valid.input_ids))
                await response.write(_event(body))
    await response.write_eof()
    return response


def add_tgi_routes(app: web.Application) -> None:
    app.router.add_post("/generate", generate)
    app.router.add_post("/generate_stream", generate_stream)
    app.router.add_post("/", compat_generate)
