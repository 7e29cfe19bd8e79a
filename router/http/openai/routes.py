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
import time
from collections.abc import AsyncIterator

from aiohttp import web

from router.core.engine import Engine, Timings, TokenEvent
from router.http.errors import Overloaded, ValidationError
from router.http.openai import tools
from router.http.openai.plan import Plan, parse_chat, parse_completion
from router.http.openai.responses import (
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatDelta,
    ChatLogprobs,
    ChoiceText,
    Completion,
    CompletionChunk,
    CompletionChunkChoice,
    CompletionLogprobs,
    ModelCard,
    ModelList,
    StreamError,
    StreamErrorDetail,
    ToolCallDelta,
    Usage,
    chat_finish_reason,
    echoed,
    envelope,
    finish_reason,
)
from router.http.protocol import dump
from router.http.responses import model_response
from router.http.sse import open_stream, reporting_failures
from router.http.state import STATE, json_body


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
    if len(choices) == 1:  # the usual case: the request's own events, without a task and queue between
        timings = Timings(queued_s=time.monotonic(), start_s=start_s)
        async with contextlib.aclosing(engine.generate(choices[0].generation(), timings)) as events:
            async for event in events:
                yield 0, event
        return
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


def _headers(start: float, usage: Usage) -> dict[str, str]:
    elapsed = time.monotonic() - start
    return {
        "x-compute-type": "sluice",
        "x-compute-time": f"{elapsed:.6f}",
        "x-total-time": str(int(elapsed * 1000)),
        "x-prompt-tokens": str(usage.prompt_tokens),
        "x-generated-tokens": str(usage.completion_tokens),
    }


def _model(request: web.Request, plan: Plan) -> str:
    return plan.model or request.app[STATE].model_id


async def chat_completions(request: web.Request) -> web.StreamResponse:
    """POST /v1/chat/completions"""
    start = time.monotonic()
    plan = await _plan(request, parse_chat)
    env = envelope("chat", _model(request, plan))
    if plan.stream:
        return await _stream(request, plan, _ChatChunks(plan, env), start)
    body = ChatCompletion.of(plan, env, await _collect(request.app[STATE].engine, plan, start))
    return model_response(body, headers=_headers(start, body.usage))


async def completions(request: web.Request) -> web.StreamResponse:
    """POST /v1/completions"""
    start = time.monotonic()
    plan = await _plan(request, parse_completion)
    env = envelope("text_completion", _model(request, plan))
    if plan.stream:
        return await _stream(request, plan, _CompletionChunks(plan, env), start)
    body = Completion.of(plan, env, await _collect(request.app[STATE].engine, plan, start))
    return model_response(body, headers=_headers(start, body.usage))


async def models(request: web.Request) -> web.Response:
    """GET /v1/models: the one served model."""
    return model_response(ModelList(data=[ModelCard(id=request.app[STATE].model_id)]))


class _ChatChunks:
    """Chat chunks: a role delta per choice first, then one content delta per token. Where tools
    may be called, a token's text may instead make several chunks, content and tool-call deltas
    in order (the first carries the token's logprobs, the last its finish reason), or one with
    empty content while a possible call marker is held back."""

    model = ChatCompletionChunk

    def __init__(self, plan: Plan, env: dict):
        self.plan, self.env = plan, env
        keep = plan.tool_format.tokens if plan.tool_format else ()
        self.texts = [ChoiceText(plan.stop, keep) for _ in range(plan.num_choices)]
        self.calls = [tools.CallStream(plan.tool_format) for _ in range(plan.num_choices)] if plan.tool_format else None
        self.plain = _TextChunk(self._text, plan)

    def opening(self) -> list[ChatCompletionChunk]:
        return [
            self._chunk(ChatChunkChoice(index=i, delta=ChatDelta(role="assistant", content=""), logprobs=None,
                                        finish_reason=None))
            for i in range(self.plan.num_choices)
        ]  # fmt: skip

    def token(self, index: int, event: TokenEvent) -> list[ChatCompletionChunk | str]:
        text = self.texts[index].add(event)
        if self.calls is None and not self.plan.logprobs and event.finish_reason is None:
            return [self.plain.json(index, text)]
        logprobs = ChatLogprobs.of([event]) if self.plan.logprobs else None
        if self.calls is None:
            delta = ChatDelta(content=text)
            return [self._chunk(ChatChunkChoice(index=index, delta=delta, logprobs=logprobs,
                                                finish_reason=finish_reason(event.finish_reason)))]  # fmt: skip
        calls = self.calls[index]
        pieces = calls.feed(text) + (calls.finish() if event.finish_reason is not None else [])
        deltas = [
            ChatDelta(content=p) if isinstance(p, str) else ChatDelta(tool_calls=[ToolCallDelta.of(p)]) for p in pieces
        ] or [ChatDelta(content="")]
        reason = chat_finish_reason(event.finish_reason, bool(calls.calls))
        return [
            self._chunk(ChatChunkChoice(index=index, delta=delta, logprobs=logprobs if i == 0 else None,
                                        finish_reason=reason if i == len(deltas) - 1 else None))
            for i, delta in enumerate(deltas)
        ]  # fmt: skip

    def _text(self, index: int, text: str) -> ChatCompletionChunk:
        return self._chunk(
            ChatChunkChoice(index=index, delta=ChatDelta(content=text), logprobs=None, finish_reason=None)
        )

    def _chunk(self, choice: ChatChunkChoice) -> ChatCompletionChunk:
        return ChatCompletionChunk(**self.env, choices=[choice])


class _CompletionChunks:
    """Completion chunks: with `echo`, the prompt per choice first (with `logprobs`, once its first
    event brings the prompt's logprobs), then one per token."""

    model = CompletionChunk

    def __init__(self, plan: Plan, env: dict):
        self.plan, self.env = plan, env
        self.texts = [ChoiceText(plan.stop) for _ in range(plan.num_choices)]
        self.offsets = [len(echoed(plan, i)) for i in range(plan.num_choices)]
        self.echo_waits_for_logprobs = plan.echo and plan.logprobs
        self.plain = _TextChunk(self._text, plan)

    def opening(self) -> list[CompletionChunk]:
        if not self.plan.echo or self.echo_waits_for_logprobs:
            return []
        return [self._echo(i, None) for i in range(self.plan.num_choices)]

    def token(self, index: int, event: TokenEvent) -> list[CompletionChunk | str]:
        if not self.plan.logprobs and event.prefill is None and event.finish_reason is None:
            self.offsets[index] += 0 if event.token.special else len(event.token.text)
            return [self.plain.json(index, self.texts[index].add(event))]
        chunks = [self._echo(index, CompletionLogprobs.of_prompt(event))] if event.prefill is not None else []
        logprobs = CompletionLogprobs.of([event], self.offsets[index]) if self.plan.logprobs else None
        self.offsets[index] += 0 if event.token.special else len(event.token.text)
        text = self.texts[index].add(event)
        choice = CompletionChunkChoice(
            index=index, text=text, logprobs=logprobs, finish_reason=finish_reason(event.finish_reason)
        )
        return chunks + [self._chunk(choice)]

    def _echo(self, index: int, logprobs: CompletionLogprobs | None) -> CompletionChunk:
        text = echoed(self.plan, index)
        return self._chunk(CompletionChunkChoice(index=index, text=text, logprobs=logprobs, finish_reason=None))

    def _text(self, index: int, text: str) -> CompletionChunk:
        return self._chunk(CompletionChunkChoice(index=index, text=text, logprobs=None, finish_reason=None))

    def _chunk(self, choice: CompletionChunkChoice) -> CompletionChunk:
        return CompletionChunk(**self.env, choices=[choice])


class _TextChunk:
    """The JSON of a chunk whose one choice carries text alone (most of a stream's chunks), written
    without building its models: `build(index, text)`'s chunk is dumped once per choice index with a
    mark for the text, and each token's text is spliced in, escaped as pydantic escapes it."""

    MARK = "SLUICE-TEXT-MARK"

    def __init__(self, build, plan: Plan):
        self.build, self.exclude = build, _chunk_exclude(plan)
        self.parts: dict[int, tuple[str, str]] = {}  # choice index -> the JSON before and after the text

    def json(self, index: int, text: str) -> str:
        if "\x7f" in text:  # the one character json.dumps escapes and pydantic does not
            return dump(self.build(index, text), self.exclude)
        if (parts := self.parts.get(index)) is None:
            before, after = dump(self.build(index, self.MARK), self.exclude).split(self.MARK)
            parts = self.parts[index] = (before, after)
        return parts[0] + json.dumps(text)[1:-1] + parts[1]


def _chunk_exclude(plan: Plan) -> set[str] | None:
    """`usage` is null on every chunk with include_usage, else absent."""
    return None if plan.include_usage else {"usage"}


def _event(data: str) -> bytes:
    return f"data: {data}\n\n".encode()


def _error_event(message: str, status: int) -> bytes:
    return _event(dump(StreamError(error=StreamErrorDetail(message=message, http_status_code=status))))


async def _stream(request: web.Request, plan: Plan, chunks, start_s: float) -> web.StreamResponse:
    """SSE: the opening chunks, one chunk per token, the usage chunk if asked, then [DONE]."""
    response = await open_stream(request, {"x-compute-type": "sluice"})
    exclude = _chunk_exclude(plan)
    for chunk in chunks.opening():
        await response.write(_event(dump(chunk, exclude)))
    num_generated = 0
    async with reporting_failures(request, response, _error_event):
        async with contextlib.aclosing(_events(request.app[STATE].engine, plan.choices(), start_s)) as events:
            async for index, event in events:
                num_generated += 1
                for chunk in chunks.token(index, event):  # a chunk, or its JSON already written
                    await response.write(_event(chunk if isinstance(chunk, str) else dump(chunk, exclude)))
        if plan.include_usage:
            last = chunks.model(**chunks.env, choices=[], usage=Usage.of(plan, num_generated))
            await response.write(_event(dump(last)))
    await response.write(_event("[DONE]"))
    await response.write_eof()
    return response


def add_openai_routes(app: web.Application) -> None:
    """Register the OpenAI-compatible routes on the router's application."""
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_post("/v1/completions", completions)
    app.router.add_get("/v1/models", models)
