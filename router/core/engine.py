"""The batching loop: the one place where the scheduler meets I/O.

`generate()` queues a validated request and yields its events; `run()` repeatedly asks the
scheduler for a step, sends it to the shards, applies the tokens, turns them into text (the
output processor, which also checks stop strings) and hands each request its event.

When the shards are lost (a shard process died, see ShardError.lost) the engine either fails
every request, running and waiting (the launcher then stops the server), or, given `reconnect`
(the launcher restarts the shard group), puts the running requests back in the queue to be
recomputed, waits for the shards to serve again, and resumes: streams continue where they were.
"""

import asyncio
import itertools
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

from opentelemetry import trace

from router.core.output_processor import OutputProcessor
from router.core.request import GenerationRequest, Request, RequestStatus
from router.core.scheduler import Scheduler, StepPlan
from router.core.shard_client import ShardedClient, ShardError, StepResult
from router.metrics import Metrics
from router.tokenizer import Tokenizer
from router.tracing import start_step_span

log = logging.getLogger(__name__)


class GenerationError(RuntimeError):
    """The shards failed while computing this request (HTTP 424)."""


def _server_error(reason: object) -> GenerationError:
    """TGI's message for a generation the shards failed."""
    return GenerationError(f"Request failed during generation: Server error: {reason}")


class ShardsNotBack(RuntimeError):
    """The shards were lost and did not come back in time: the batching loop ends (the router exits)."""


class _RecoveryStopped(Exception):
    """The server stopped (stop_resuming) while the engine waited for the shards."""


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
    # On the first event, if asked: the prompt's tokens with their logprobs (the first's is NaN) and,
    # with prompt_top_n, the most likely tokens at each prompt position (none for the first).
    prefill: list[Token] | None = None
    prefill_top_tokens: list[list[Token]] | None = None


@dataclass(slots=True)
class Timings:
    queued_s: float  # validated and handed to the engine
    start_s: float | None = None  # the HTTP handler started (default: queued_s)
    batched_s: float | None = None  # first time the request was put in a step


@dataclass(slots=True)
class _InFlight:
    """A step sent to the shards whose result has not been applied yet."""

    plan: StepPlan
    method: str
    span: trace.Span
    trace_context: dict[str, str]
    sent_s: float


@dataclass(slots=True)
class _Handle:
    request: Request
    spec: GenerationRequest
    output: OutputProcessor
    timings: Timings
    span: trace.Span  # the HTTP request's span (non-recording when untraced)
    prompt_logprobs: list[float] | None = None  # by prompt position, filled as chunks are computed
    prompt_top_tokens: list[list[tuple[int, float]]] | None = None  # likewise, with prompt_top_n
    num_events: int = 0
    events: asyncio.Queue = field(default_factory=asyncio.Queue)


class Engine:
    def __init__(
        self,
        scheduler: Scheduler,
        shards: ShardedClient,
        tokenizer: Tokenizer,
        eos_token_ids: list[int],
        metrics: Metrics,
        step_timeout_s: float | None = None,
        max_steps_in_flight: int = 2,
        reconnect: Callable[[], Awaitable[int]] | None = None,
        decoder_start_token_id: int | None = None,
    ):
        """`decoder_start_token_id`, for an encoder-decoder model: a request's input goes to the
        encoder, and its decoder starts from that token (TGI's seq2seq path). `reconnect`, when the
        launcher restarts lost shards: waits for them to serve again (warmed up) and returns their
        number of KV blocks, or raises once they will not (TimeoutError, ShardError). Without it,
        losing the shards fails every request."""
        self.scheduler = scheduler
        self.max_steps_in_flight = max_steps_in_flight
        self.step_timeout_s = step_timeout_s
        self.is_healthy = True  # false after a failed step whose recovery (ClearCache) failed too
        self.recovering = False  # the shards were lost; requests wait until they serve again
        self._reset_pending = False  # a failed step's ClearCache has not succeeded yet
        self._reconnect = reconnect
        self._resumes = reconnect is not None  # off once the server stops: then a loss fails requests
        self._stop_recovery = asyncio.Event()
        self._requeued: list[Request] = []  # put back in the queue when the shards were lost
        self._restart_notice: str | None = None  # the launcher said it restarts the shards
        self.metrics = metrics
        self.shards = shards
        self.tokenizer = tokenizer
        self.eos_token_ids = frozenset(eos_token_ids)
        self.decoder_start_token_id = decoder_start_token_id
        self._handles: dict[int, _Handle] = {}
        self._ids = itertools.count()
        self._wake = asyncio.Event()
        self.last_step: StepResult | None = None
        metrics.watch(scheduler)

    @property
    def num_requests(self) -> int:
        return len(self._handles)

    async def generate(self, spec: GenerationRequest, timings: Timings) -> AsyncIterator[TokenEvent]:
        """Queue `spec` and yield one event per generated token; the last carries the finish.

        Raises GenerationError if the shards fail. Leaving the iteration early (client gone)
        aborts the request and frees its blocks.
        """
        request = Request(
            req_id=next(self._ids),
            prompt_ids=spec.input_ids if self.decoder_start_token_id is None else [self.decoder_start_token_id],
            max_new_tokens=spec.max_new_tokens,
            sampling=spec.sampling,
            eos_token_ids=self.eos_token_ids,
            ignore_eos=spec.ignore_eos,
            min_new_tokens=spec.min_new_tokens,
            needs_prompt_logprobs=spec.prompt_logprobs,
            prompt_top_n=spec.prompt_top_n,
            grammar=spec.grammar,
            stop_token_ids=spec.stop_token_ids,
            encoder_ids=spec.input_ids if self.decoder_start_token_id is not None else [],
            arrival_s=timings.queued_s,
        )
        # A decoder's output continues its prompt's text; a seq2seq output (after a special start token) starts anew.
        output = OutputProcessor(self.tokenizer, [] if request.encoder_ids else spec.input_ids, spec.stop)
        handle = _Handle(request, spec, output, timings, trace.get_current_span())
        if spec.prompt_logprobs:
            handle.prompt_logprobs = [float("nan")] * len(request.prompt_ids)  # the decoder's prompt
            handle.prompt_top_tokens = [[] for _ in request.prompt_ids]
        self._handles[request.req_id] = handle
        self.scheduler.add(request)
        self.metrics.request_input_length.observe(len(spec.input_ids))
        self.metrics.request_max_new_tokens.observe(spec.max_new_tokens)
        self._wake.set()
        ended = False  # the last event (or the error) was handed over
        try:
            while True:
                event = await handle.events.get()
                if isinstance(event, Exception):
                    ended = True
                    self.metrics.request_failure.labels("generation").inc()
                    raise event
                if event.finish_reason is not None:
                    ended = True
                    self._record_success(handle)
                yield event
                if ended:
                    return
        finally:
            if not request.status.is_finished:
                self.scheduler.finish(request, RequestStatus.FINISHED_ABORTED)
            if not ended:  # the client left first: its request was aborted, or its last tokens went unread
                self.metrics.request_failure.labels("dropped").inc()
            self._handles.pop(request.req_id, None)

    def _record_success(self, handle: _Handle) -> None:
        request, timings = handle.request, handle.timings
        m, end = self.metrics, time.monotonic()
        start, batched = timings.start_s or timings.queued_s, timings.batched_s or end
        num_generated = len(request.output_ids)
        m.request_success.inc()
        m.request_duration.observe(end - start)
        m.request_validation_duration.observe(timings.queued_s - start)
        m.request_queue_duration.observe(batched - timings.queued_s)
        m.request_inference_duration.observe(end - batched)
        m.request_mean_time_per_token_duration.observe((end - batched) / max(num_generated, 1))
        m.request_generated_tokens.observe(num_generated)
        if handle.span.is_recording():  # TGI's span fields, in seconds
            handle.span.set_attributes(
                {
                    "total_time": end - start,
                    "validation_time": timings.queued_s - start,
                    "queue_time": batched - timings.queued_s,
                    "inference_time": end - batched,
                    "time_per_token": (end - batched) / max(num_generated, 1),
                    "seed": str(request.sampling.seed) if handle.spec.report_seed else "",
                    "generated_tokens": num_generated,
                    "input_length": len(request.prompt_ids),
                }
            )

    async def run(self) -> None:
        """Step forever; never raises for a failed step (its requests get the error).

        Up to `max_steps_in_flight` steps are queued on the shards: with 2, the next step is
        scheduled and sent while the shards compute the current one, so the router's work
        (scheduling, protobuf, detokenization) hides behind the forward. With 3 (the server's
        default) a step's answer, the router's work on it and the next step's trip to the shards
        also hide behind the forward of the step queued between them: at small batches on a GPU
        that round trip is longer than a forward. The shards feed each request's last sampled
        token to its next decode themselves.
        """
        in_flight: deque[_InFlight] = deque()
        while True:
            try:
                if self.recovering:
                    await self._recover()
                else:
                    await self._advance(in_flight)
            except ShardsNotBack:
                raise
            except Exception as e:  # a bug here must fail the requests in flight, never hang them
                log.exception("the engine failed a step")
                self._fail_steps(in_flight, ShardError(f"internal error: {e!r}"))

    async def _advance(self, in_flight: deque[_InFlight]) -> None:
        """One turn of the loop: wait for work, send a step, or apply the oldest step's result."""
        if self._restart_notice is not None:
            self._abandon_steps(in_flight, ShardError(self._restart_notice, lost=True))
            self._await_shards(self._restart_notice)
            return
        if not in_flight and not self.scheduler.has_work:
            self._wake.clear()
            await self._wake.wait()
            return
        if self._reset_pending and not in_flight and not await self._reset_shards():
            if not self.recovering:
                self._fail_waiting("the shards could not be reset")
            return
        if len(in_flight) < self.max_steps_in_flight and self.scheduler.has_work:
            plan = self.scheduler.schedule()
            if not plan.is_empty:
                step = self._start_step(plan)
                in_flight.append(step)
                try:
                    await self.shards.send(plan, step.trace_context)
                except ShardError as e:
                    await self._step_failed(in_flight, e)
                return
            if not in_flight:
                self._fail_unschedulable()
                await asyncio.sleep(0)
                return
        try:
            result = await self.shards.receive(self.step_timeout_s)
        except ShardError as e:
            await self._step_failed(in_flight, e)
            return
        self._finish_step(in_flight.popleft(), result)

    def _start_step(self, plan: StepPlan) -> _InFlight:
        now = time.monotonic()
        for s in plan.scheduled:
            timings = self._handles[s.request.req_id].timings
            timings.batched_s = timings.batched_s or now
        method = self._record_plan(plan)
        span, trace_context = start_step_span(
            [self._handles[s.request.req_id].span for s in plan.scheduled],
            {"step_id": plan.step_id, "method": method, "batch_size": len(plan.scheduled)},
        )
        return _InFlight(plan, method, span, trace_context, now)

    def _finish_step(self, step: _InFlight, result: StepResult) -> None:
        """Apply a step's tokens: turn them into text, check stops, hand each request its event."""
        step.span.end()
        self.is_healthy = True
        received = time.monotonic()
        self.last_step = result
        self._store_prompt_logprobs(result)
        self.scheduler.step_costs.observe(step.plan.work, result.forward_ns / 1e9)
        token_ids = {req_id: t.token_id for req_id, t in result.tokens.items()}
        completed = frozenset(req_id for req_id, t in result.tokens.items() if t.grammar_completed)
        for request in self.scheduler.update(step.plan, token_ids, completed):
            self._emit(request, result)
        m = self.metrics
        m.batch_inference_success.labels(step.method).inc()
        m.batch_inference_duration.labels(step.method).observe(received - step.sent_s)
        m.batch_forward_duration.labels(step.method).observe(result.forward_ns / 1e9)
        m.batch_sample_duration.labels(step.method).observe(result.sample_ns / 1e9)
        m.batch_decode_duration.labels(step.method).observe(time.monotonic() - received)

    async def _step_failed(self, in_flight: deque[_InFlight], error: ShardError) -> None:
        """A step failed on the shards. If they were lost and are being restarted, the running
        requests wait to be recomputed; otherwise they fail, and the waiting ones too when the
        shards are gone."""
        if self._resumes and await self._shards_lost(error):
            steps = ", ".join(step.method for step in in_flight) or "none"
            self._abandon_steps(in_flight, error)
            self._await_shards(f"{error}; steps in flight: {steps}")
            return
        self._fail_steps(in_flight, error)
        if error.lost:
            self._fail_waiting(error)

    async def _shards_lost(self, error: ShardError) -> bool:
        """Whether `error` means a shard is gone. With several ranks the first error may come from
        a survivor (its collective broke), so the ranks are asked when it does not say."""
        if error.lost:
            return True
        if error.timed_out:  # stuck, not gone: the step timeout's reset handles it
            return False
        gone = await self.shards.unreachable()
        if gone:
            log.warning("%s; unreachable: %s", error, ", ".join(gone))
        return bool(gone)

    def _abandon_steps(self, in_flight: deque[_InFlight], error: ShardError) -> None:
        for step in in_flight:
            step.span.record_exception(error)
            step.span.end()
            self.metrics.batch_inference_failure.labels(step.method).inc()
        in_flight.clear()

    def _fail_steps(self, in_flight: deque[_InFlight], error: ShardError) -> None:
        """A shard failed: the steps in flight and every running request fail; the loop resets
        the shards before its next step."""
        log.error("step failed: %s", error)
        self._abandon_steps(in_flight, error)
        for request in self.scheduler.fail_all():
            handle = self._handles.get(request.req_id)
            if handle is not None:
                handle.events.put_nowait(_server_error(error))
        self._reset_pending = True

    # -- losing the shards, and getting them back ---------------------------------------------------
    def shards_restarting(self) -> None:
        """The launcher says it restarts the shard group (SIGUSR1): wait for the new one and warm it up,
        even with nothing in flight to notice the loss (a request would otherwise meet cold shards)."""
        if self._resumes and not self.recovering:
            self._restart_notice = "the launcher is restarting the shards"
            self._wake.set()

    def _await_shards(self, error: object) -> None:
        """The shards were lost: requeue the running requests and wait for the shards to be back."""
        self._restart_notice = None
        self._requeued = self.scheduler.requeue_all()
        self.shards.reset_streams()
        self.recovering = True
        log.warning(
            "lost the shards (%s): %d running and %d queued request(s) wait for them to be restarted",
            error,
            len(self._requeued),
            len(self.scheduler.waiting) - len(self._requeued),
        )

    async def _recover(self) -> None:
        """Wait for the restarted shards, then resume with a KV pool of their new size. If the
        server stops meanwhile, every request fails; if the shards do not come back, too, and
        ShardsNotBack ends the loop."""
        started = time.monotonic()
        try:
            num_blocks = await self._reconnect_unless_stopped()
        except _RecoveryStopped:
            self._give_up("the server is stopping and the shards are gone")
            return
        except Exception as e:  # noqa: BLE001 - whatever kept them away, the requests must not wait forever
            reason = f"the shards did not come back: {e or type(e).__name__}"
            self._give_up(reason)
            raise ShardsNotBack(reason) from e
        kv = self.scheduler.kv_cache_manager
        old_blocks = kv.num_blocks
        kv.resize(num_blocks)
        self.metrics.batch_max_total_tokens.set(num_blocks * kv.block_size)
        resumed = [r for r in self._requeued if not r.status.is_finished]
        self._requeued = []
        self.metrics.shard_restarts.inc()
        self.metrics.requests_resumed.inc(len(resumed))
        self.recovering = False
        self.is_healthy, self._reset_pending = True, False
        log.info(
            "the shards are back after %.1f s (KV cache: %d blocks, was %d); %d request(s) resume",
            time.monotonic() - started,
            num_blocks,
            old_blocks,
            len(resumed),
        )
        self._wake.set()

    async def _reconnect_unless_stopped(self) -> int:
        reconnect = asyncio.ensure_future(self._reconnect())
        stopped = asyncio.ensure_future(self._stop_recovery.wait())
        try:
            await asyncio.wait({reconnect, stopped}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopped.cancel()
            if not reconnect.done():
                reconnect.cancel()
                await asyncio.gather(reconnect, return_exceptions=True)
        if not reconnect.done() or reconnect.cancelled():
            raise _RecoveryStopped()
        return reconnect.result()

    def _give_up(self, reason: str) -> None:
        """Stop waiting for the shards: every request fails with `reason`."""
        log.error("%s: failing %d request(s)", reason, len(self._handles))
        self.recovering = False
        self._resumes = False
        self._requeued = []
        self.is_healthy = False
        self._reset_pending = True
        self.abort_all(reason)

    def stop_resuming(self) -> None:
        """The server is stopping: from now on, losing the shards fails the requests, and a wait
        for lost shards ends at once with every request failed."""
        self._resumes = False
        self._stop_recovery.set()

    def abort_all(self, reason: str) -> None:
        """End every request, running or waiting, now: its client gets an error with `reason`."""
        for request in [*self.scheduler.running, *self.scheduler.waiting]:
            self.scheduler.finish(request, RequestStatus.FINISHED_ERROR)
            handle = self._handles.get(request.req_id)
            if handle is not None:
                handle.events.put_nowait(_server_error(reason))

    def _record_plan(self, plan: StepPlan) -> str:
        """Count `plan` in the step metrics; returns its method label. (The gauges of the queue,
        batch and KV blocks read the scheduler when scraped: Metrics.watch.)"""
        m, scheduler = self.metrics, self.scheduler
        prompt_tokens = sum(
            max(0, min(s.start_position + s.num_scheduled_tokens, len(s.request.prompt_ids)) - s.start_position)
            for s in plan.scheduled
        )
        num_new = sum(s.is_new for s in plan.scheduled)
        if num_new:
            m.batch_next_size.observe(num_new)
            if len(scheduler.running) > num_new:  # prompts ride along with running decodes
                m.batch_concat.labels("chunking").inc()
        m.prompt_tokens_computed.inc(prompt_tokens)
        method = "prefill" if prompt_tokens else "decode"
        m.batch_inference_count.labels(method).inc()
        return method

    def _store_prompt_logprobs(self, result: StepResult) -> None:
        for req_id, computed in result.prompt_logprobs.items():
            handle = self._handles.get(req_id)
            if handle is None or handle.prompt_logprobs is None:
                continue
            first = computed.first_position
            end = min(first + len(computed.logprobs), len(handle.prompt_logprobs))  # recomputed outputs are not prompt
            handle.prompt_logprobs[first:end] = computed.logprobs[: end - first]
            handle.prompt_top_tokens[first:end] = computed.top_tokens[: end - first] or [[]] * (end - first)

    def _prefill(self, handle: _Handle) -> tuple[list[Token], list[list[Token]]]:
        """The prompt's tokens with their logprobs, and the most likely tokens at each position."""
        ids, t = handle.request.prompt_ids, self.tokenizer
        tokens = [Token(i, t.token_text(i), lp, i in t.special_ids) for i, lp in zip(ids, handle.prompt_logprobs)]
        return tokens, [[self._token(i, lp) for i, lp in top] for top in handle.prompt_top_tokens]

    def _token(self, token_id: int, logprob: float) -> Token:
        return Token(token_id, self.tokenizer.token_text(token_id), logprob, token_id in self.tokenizer.special_ids)

    def _emit(self, request: Request, result: StepResult) -> None:
        """Hand `request` the event of the token it just received; end it on a stop string."""
        handle = self._handles[request.req_id]
        produced = result.tokens[request.req_id]
        token_id = request.output_ids[-1]
        out = handle.output.process(token_id, request.status)
        if out.stop_matched:
            self.scheduler.finish(request, RequestStatus.FINISHED_STOP_SEQUENCE)
        prefill = prefill_top = None
        if handle.num_events == 0 and handle.prompt_logprobs is not None:  # the prompt is computed in full now
            prefill, prefill_top = self._prefill(handle)
        handle.num_events += 1
        top = [self._token(i, lp) for i, lp in produced.top_tokens]
        token = Token(token_id, out.text, produced.logprob, out.special)
        handle.events.put_nowait(
            TokenEvent(
                token,
                top,
                out.finish_reason,
                out.generated_text,
                prefill,
                prefill_top if request.prompt_top_n else None,
            )
        )

    async def _reset_shards(self) -> bool:
        """ClearCache on every shard, within the step timeout. Until one succeeds the engine is
        unhealthy and tries again before its next step, so a hung shard never blocks it for long."""
        try:
            await self.shards.clear_cache(self.step_timeout_s)
        except ShardError as e:
            if self._resumes and await self._shards_lost(e):
                self._await_shards(e)
                return False
            self.is_healthy = False
            log.error("resetting the shards failed; trying again before the next step: %s", e)
            return False
        self._reset_pending = False
        self.is_healthy = True  # the shards answered the reset: healthy again
        return True

    def _fail_waiting(self, reason: object) -> None:
        """End every queued request with a server error (the shards cannot serve them)."""
        for request in list(self.scheduler.waiting):
            self.scheduler.finish(request, RequestStatus.FINISHED_ERROR)
            self._handles[request.req_id].events.put_nowait(_server_error(reason))

    def _fail_unschedulable(self) -> None:
        """Nothing runs and the head of the queue cannot fit in the whole pool."""
        if self.scheduler.running or not self.scheduler.waiting:
            return
        request = self.scheduler.waiting[0]
        self.scheduler.finish(request, RequestStatus.FINISHED_ERROR)
        self._handles[request.req_id].events.put_nowait(
            GenerationError(f"Request failed during generation: {request.num_tokens} tokens do not fit in the KV cache")
        )
