"""The OpenAI routes: POST /v1/chat/completions, POST /v1/completions, GET /v1/models.

Handlers only: request parsing and JSON shapes live in `router.http.openai.protocol` (whose docstring
lists the deliberate deviations from OpenAI and TGI). Errors before a stream starts use TGI's
JSON and status codes (422 validation and template errors, 429 overloaded, 424 generation);
after it started they arrive as `data: {"error": {"message", "http_status_code"}}` followed by
`data: [DONE]`. A client that goes away aborts every request it started.
"""

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator

from aiohttp import web

from router.core.engine import Engine, GenerationError, Timings, TokenEvent
from router.http.errors import Overloaded, ValidationError
from router.http.openai.protocol import (
    ChoiceText,
    Plan,
    chat_delta,
    chat_response,
    chunk,
    completion_delta,
    completion_response,
    echoed,
    envelope,
    parse_chat,
    parse_completion,
    usage,
)
from router.http.state import STATE, json_body

log = logging.getLogger(__name__)


async def _plan(request: web.Request, parse) -> Plan:
    """Parse and validate the body (in a thread: it tokenizes).

    The concurrency middleware holds one slot per HTTP request; a request with several choices
    also needs room for all of them among the engine's requests (429 otherwise).
    """
    body = await json_body(request)
    state = request.app[STATE]
    plan = await asyncio.to_thread(parse, body, state.tokenizer, state.limits)
    if plan.num_choices > state.max_concurrent_requests:
        raise ValidationError(
            f"`n` times the number of prompts must be <= {state.max_concurrent_requests}. Given: {plan.num_choices}"
        )
    if state.engine.num_requests + plan.num_choices > state.max_concurrent_requests:
        raise Overloaded()
    return plan


async def _events(engine: Engine, choices: list, start_s: float) -> AsyncIterator[tuple[int, TokenEvent]]:
    """Run every choice's request at once and yield `(choice index, event)` as they come.

    Raises the first failure. Closing this iterator early (or cancelling its consumer) aborts
    every request still running.
    """
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(index: int, valid) -> None:
        try:
            async with contextlib.aclosing(
                engine.generate(valid.generation(), Timings(queued_s=time.monotonic(), start_s=start_s))
            ) as events:
                async for event in events:
                    queue.put_nowait((index, event))
        except Exception as e:  # GenerationError, or a bug: the consumer raises it
            queue.put_nowait((index, e))
            return
        queue.put_nowait((index, None))

    tasks = [asyncio.create_task(pump(i, valid)) for i, valid in enumerate(choices)]
    try:
        running = len(tasks)
        while running:
            index, item = await queue.get()
            if isinstance(item, Exception):
                raise item
            if item is None:
                running -= 1
            else:
                yield index, item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def _collect(engine: Engine, plan: Plan, start_s: float) -> list[list[TokenEvent]]:
    results: list[list[TokenEvent]] = [[] for _ in range(plan.num_choices)]
    async with contextlib.aclosing(_events(engine, plan.choices(), start_s)) as events:
        async for index, event in events:
            results[index].append(event)
    return results


def _headers(plan: Plan, start: float, body: dict) -> dict[str, str]:
    elapsed = time.monotonic() - start
    return {
        "x-compute-type": "sluice",
        "x-compute-time": f"{elapsed:.6f}",
        "x-total-time": str(int(elapsed * 1000)),
        "x-prompt-tokens": str(body["usage"]["prompt_tokens"]),
        "x-generated-tokens": str(body["usage"]["completion_tokens"]),
    }


def _model(request: web.Request, plan: Plan) -> str:
    return plan.model or request.app[STATE].model_id


async def chat_completions(request: web.Request) -> web.StreamResponse:
    """POST /v1/chat/completions"""
    start = time.monotonic()
    plan = await _plan(request, parse_chat)
    env = envelope("chat.completion.chunk" if plan.stream else "chat.completion", _model(request, plan))
    if plan.stream:
        return await _stream(request, plan, _ChatChunks(plan, env), start)
    body = chat_response(plan, env, await _collect(request.app[STATE].engine, plan, start))
    return web.json_response(body, headers=_headers(plan, start, body))


async def completions(request: web.Request) -> web.StreamResponse:
    """POST /v1/completions"""
    start = time.monotonic()
    plan = await _plan(request, parse_completion)
    env = envelope("text_completion", _model(request, plan))
    if plan.stream:
        return await _stream(request, plan, _CompletionChunks(plan, env), start)
    body = completion_response(plan, env, await _collect(request.app[STATE].engine, plan, start))
    return web.json_response(body, headers=_headers(plan, start, body))


async def models(request: web.Request) -> web.Response:
    """GET /v1/models: the one served model."""
    model_id = request.app[STATE].model_id
    return web.json_response(
        {"object": "list", "data": [{"id": model_id, "object": "model", "created": 0, "owned_by": "sluice"}]}
    )


class _ChatChunks:
    """Chat chunks: a role delta per choice first, then one content delta per token."""

    def __init__(self, plan: Plan, env: dict):
        self.plan, self.env = plan, env
        self.texts = [ChoiceText(plan.stop) for _ in range(plan.num_choices)]

    def opening(self) -> list[dict]:
        delta = {"role": "assistant", "content": ""}
        return [chunk(self.plan, self.env, chat_delta(self.plan, i, delta, None)) for i in range(self.plan.num_choices)]

    def token(self, index: int, event: TokenEvent) -> dict:
        delta = {"content": self.texts[index].add(event)}
        return chunk(self.plan, self.env, chat_delta(self.plan, index, delta, event))


class _CompletionChunks:
    """Completion chunks: the echoed prompt per choice first (with `echo`), then one per token."""

    def __init__(self, plan: Plan, env: dict):
        self.plan, self.env = plan, env
        self.texts = [ChoiceText(plan.stop) for _ in range(plan.num_choices)]
        self.offsets = [len(echoed(plan, i)) for i in range(plan.num_choices)]

    def opening(self) -> list[dict]:
        if not self.plan.echo:
            return []
        return [
            chunk(self.plan, self.env, completion_delta(self.plan, i, echoed(self.plan, i), None, 0))
            for i in range(self.plan.num_choices)
        ]

    def token(self, index: int, event: TokenEvent) -> dict:
        text = self.texts[index].add(event)
        choice = completion_delta(self.plan, index, text, event, self.offsets[index])
        self.offsets[index] += 0 if event.token.special else len(event.token.text)
        return chunk(self.plan, self.env, choice)


async def _send(response: web.StreamResponse, body: dict | str) -> None:
    data = body if isinstance(body, str) else json.dumps(body)
    await response.write(f"data: {data}\n\n".encode())


async def _stream(request: web.Request, plan: Plan, chunks, start_s: float) -> web.StreamResponse:
    """SSE: the opening chunks, one chunk per token, the usage chunk if asked, then [DONE]."""
    response = web.StreamResponse(
        headers={
            "Content-Type": "text/event-stream",
            "Cache-Control": "no-cache",
            "X-Accel-Buffering": "no",
            "x-compute-type": "sluice",
        }
    )
    await response.prepare(request)
    for body in chunks.opening():
        await _send(response, body)
    num_generated = 0
    try:
        async with contextlib.aclosing(_events(request.app[STATE].engine, plan.choices(), start_s)) as events:
            async for index, event in events:
                num_generated += 1
                await _send(response, chunks.token(index, event))
        if plan.include_usage:
            await _send(response, {**chunks.env, "choices": [], "usage": usage(plan, num_generated)})
    except GenerationError as e:
        await _send(response, {"error": {"message": str(e), "http_status_code": 424}})
    except ConnectionError:
        raise  # the client went away: the requests were aborted when the iterator closed
    except Exception:
        log.exception("stream failed on %s", request.path)
        await _send(response, {"error": {"message": "Internal server error", "http_status_code": 500}})
    await _send(response, "[DONE]")
    await response.write_eof()
    return response


def add_openai_routes(app: web.Application) -> None:
    """Register the OpenAI-compatible routes on the router's application."""
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_post("/v1/completions", completions)
    app.router.add_get("/v1/models", models)
