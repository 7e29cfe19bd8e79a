"""The batching loop: the one place where the scheduler meets I/O.

`generate()` queues a validated request and yields its events; `run()` repeatedly asks the
scheduler for a step, sends it to the shards, applies the tokens, detokenizes them, checks
stop sequences and hands each request its event.
"""

import asyncio
import itertools
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from router.request import FINISH_REASONS, Request, RequestStatus
from router.scheduler import Scheduler, StepPlan
from router.shard_client import ShardedClient, ShardError, StepResult
from router.tokenizer import IncrementalDetokenizer, Tokenizer
from router.validation import ValidRequest

log = logging.getLogger(__name__)


class GenerationError(RuntimeError):
    """The shards failed while computing this request (HTTP 424)."""


@dataclass(frozen=True, slots=True)
class Token:
    id: int
    text: str
    logprob: float
    special: bool


@dataclass(frozen=True, slots=True)
class TokenEvent:
    token: Token
    top_tokens: list[Token]
    finish_reason: str | None = None  # set on the last event, with the text below
    generated_text: str | None = None


@dataclass(slots=True)
class Timings:
    queued_s: float
    batched_s: float | None = None  # first time the request was put in a step


@dataclass(slots=True)
class _Handle:
    request: Request
    valid: ValidRequest
    detokenizer: IncrementalDetokenizer
    timings: Timings
    events: asyncio.Queue = field(default_factory=asyncio.Queue)


class Engine:
    def __init__(self, scheduler: Scheduler, shards: ShardedClient, tokenizer: Tokenizer, eos_token_ids: list[int]):
        self.scheduler = scheduler
        self.shards = shards
        self.tokenizer = tokenizer
        self.eos_token_ids = frozenset(eos_token_ids)
        self._handles: dict[int, _Handle] = {}
        self._ids = itertools.count()
        self._wake = asyncio.Event()
        self.last_step: StepResult | None = None

    @property
    def num_requests(self) -> int:
        return len(self._handles)

    async def generate(self, valid: ValidRequest, timings: Timings) -> AsyncIterator[TokenEvent]:
        """Queue `valid` and yield one event per generated token; the last carries the finish.

        Raises GenerationError if the shards fail. Leaving the iteration early (client gone)
        aborts the request and frees its blocks.
        """
        request = Request(
            req_id=next(self._ids),
            prompt_ids=valid.input_ids,
            max_new_tokens=valid.max_new_tokens,
            sampling=valid.sampling,
            eos_token_ids=self.eos_token_ids,
            ignore_eos=valid.ignore_eos,
            min_new_tokens=valid.min_new_tokens,
            arrival_s=timings.queued_s,
        )
        handle = _Handle(request, valid, IncrementalDetokenizer(self.tokenizer, valid.input_ids), timings)
        self._handles[request.req_id] = handle
        self.scheduler.add(request)
        self._wake.set()
        try:
            while True:
                event = await handle.events.get()
                if isinstance(event, Exception):
                    raise event
                yield event
                if event.finish_reason is not None:
                    return
        finally:
            if not request.status.is_finished:
                self.scheduler.finish(request, RequestStatus.FINISHED_ABORTED)
            self._handles.pop(request.req_id, None)

    async def run(self) -> None:
        """Step forever; never raises for a failed step (its requests get the error)."""
        while True:
            if not self.scheduler.has_work:
                self._wake.clear()
                await self._wake.wait()
                continue
            plan = self.scheduler.schedule()
            if plan.is_empty:
                self._fail_unschedulable()
                await asyncio.sleep(0)
                continue
            now = time.monotonic()
            for s in plan.scheduled:
                timings = self._handles[s.request.req_id].timings
                timings.batched_s = timings.batched_s or now
            try:
                result = await self.shards.step(plan)
            except ShardError as e:
                await self._fail_step(plan, e)
                continue
            self.last_step = result
            token_ids = {req_id: t.token_id for req_id, t in result.tokens.items()}
            for request in self.scheduler.update(plan, token_ids):
                self._emit(request, result)

    def _emit(self, request: Request, result: StepResult) -> None:
        handle = self._handles[request.req_id]
        produced = result.tokens[request.req_id]
        token_id = request.output_ids[-1]
        text = handle.detokenizer.add(token_id)
        stop = handle.valid.stop
        if stop and not request.status.is_finished:
            window = handle.detokenizer.text[-(len(text) + max(map(len, stop))) :]
            if any(s in window for s in stop):
                self.scheduler.finish(request, RequestStatus.FINISHED_STOP_SEQUENCE)
        finish_reason = generated_text = None
        if request.status.is_finished:
            text += handle.detokenizer.flush()
            finish_reason, generated_text = FINISH_REASONS[request.status], handle.detokenizer.text
        special = token_id in self.tokenizer.special_ids
        top = [
            Token(i, self.tokenizer.token_text(i), lp, i in self.tokenizer.special_ids) for i, lp in produced.top_tokens
        ]
        handle.events.put_nowait(
            TokenEvent(Token(token_id, text, produced.logprob, special), top, finish_reason, generated_text)
        )

    async def _fail_step(self, plan: StepPlan, error: ShardError) -> None:
        """A shard failed: every request it was computing fails; the shards start clean."""
        log.error("step %d failed: %s", plan.step_id, error)
        for request in list(self.scheduler.running):
            self.scheduler.finish(request, RequestStatus.FINISHED_ERROR)
            handle = self._handles.get(request.req_id)
            if handle is not None:
                handle.events.put_nowait(GenerationError(f"Request failed during generation: Server error: {error}"))
        try:
            await self.shards.clear_cache()
        except ShardError as e:
            log.error("clearing the shards' caches failed: %s", e)

    def _fail_unschedulable(self) -> None:
        """Nothing runs and the head of the queue cannot fit in the whole pool."""
        if self.scheduler.running or not self.scheduler.waiting:
            return
        request = self.scheduler.waiting[0]
        self.scheduler.finish(request, RequestStatus.FINISHED_ERROR)
        self._handles[request.req_id].events.put_nowait(
            GenerationError(f"Request failed during generation: {request.num_tokens} tokens do not fit in the KV cache")
        )
