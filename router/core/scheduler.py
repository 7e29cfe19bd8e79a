"""Continuous batching policy: which requests compute how many tokens in the next step.

Data flows as `Request` (router state) -> `StepPlan` (this module) -> `StepRequest` (proto,
built in shard_client.py) -> `StepInput` (shard) -> `ForwardContext` (shard attention).
The scheduler is synchronous and does no I/O: `schedule()` returns a plan, `update()`
applies the tokens the shards produced for it. Plans may be scheduled ahead of results (the
engine keeps one step in flight while it prepares the next): a request's computed tokens
advance when it is scheduled, and a token its step will sample is counted as pending until
the result arrives; the shards feed that token to the next decode themselves.

Rules:
- Running requests come first, oldest first; each decodes one token, or continues its
  prompt in chunks when it was admitted with a prompt longer than the prefill budget.
- Waiting requests are admitted first-come-first-served while the batch size, the prefill
  token budget and free blocks allow; the head of the queue is never skipped.
- While requests decode, the chunks of long prompts (over `long_prompt_tokens`, as vLLM's
  long_prefill_token_threshold) are also limited in time: with `max_prefill_slowdown` K, they
  may make the step at most K times as long as its decodes alone would take, as predicted by a
  model of step costs learned from the shards' forward times (step_cost.py), times the number of
  requests with prompt tokens to compute per decoding request when that is above 1. A long
  prompt then advances a chunk per step without stalling the streams; each step's first chunk
  is at least `min_chunk_tokens`, so every prompt progresses. Short prompts go in whole, within
  the token budget: on a CPU, prefill in small pieces costs ~30% more per token.
- A request admitted from the queue reuses the cached blocks of its longest cached prefix
  and computes only the rest; blocks join the cache in the step that fills them, so
  requests arriving together share a common prefix's computation too.
- Blocks cover exactly the tokens computed so far; with a sliding window over every layer, only
  from the window of the step's first token on (kv_cache_manager.py gives back the blocks behind
  it), so a request of any length is admitted and runs on about window + chunk tokens of blocks:
  admission and growth ask the KV cache manager for exactly what the step needs. When a running
  request needs a block and none is free, the newest running request is preempted: its blocks
  are freed, the shards forget it, and it waits at the front of the queue to be recomputed.
"""

from collections import deque
from dataclasses import dataclass

from router.core.kv_cache_manager import KVCacheManager
from router.core.request import Request, RequestStatus
from router.core.step_cost import StepCostModel, StepWork


@dataclass(frozen=True, slots=True)
class SchedulerConfig:
    max_batch_size: int
    max_batch_prefill_tokens: int  # prompt tokens computed per step
    # TGI's admission gate: while requests run, new ones join only once at least this fraction
    # of the running count is waiting, or after max_waiting_tokens steps without admission.
    # 0 admits at every step, which suits chunked prefill (prompts ride along with decodes).
    waiting_served_ratio: float = 0.0
    max_waiting_tokens: int = 20
    # While requests decode, the chunks of long prompts may make a step at most this many times as
    # long as its decodes alone (predicted); 0 lifts the limit (only max_batch_prefill_tokens applies).
    max_prefill_slowdown: float = 2.0
    long_prompt_tokens: int = 512  # prompts (or recomputed sequences) longer than this are "long"
    min_chunk_tokens: int = 16


@dataclass(frozen=True, slots=True)
class ScheduledRequest:
    request: Request
    num_scheduled_tokens: int
    is_new: bool  # the shards do not hold this request: it is sent in full
    new_block_ids: list[int]  # blocks appended for this step (all of them when is_new)
    start_position: int  # tokens computed before this step (for a new request: the prefix-cache hit)
    incarnation: int  # the request's preemption count when scheduled: older results are stale
    produces_token: bool  # the step computes the request's last known token, so it samples one
    encoder_block_ids: list[int] = ()  # when is_new, of an encoder-decoder model: its encoder's blocks


@dataclass(frozen=True, slots=True)
class StepPlan:
    step_id: int
    scheduled: list[ScheduledRequest]  # new requests first, then running ones: the shard's order
    forget_req_ids: list[int]

    @property
    def is_empty(self) -> bool:
        return not self.scheduled

    @property
    def work(self) -> StepWork:
        """What the step computes, for the step cost model."""
        return StepWork.total((s.start_position, s.num_scheduled_tokens) for s in self.scheduled)


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv_cache_manager: KVCacheManager):
        self.config = config
        self.kv_cache_manager = kv_cache_manager
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []  # in admission order
        self._forget: list[int] = []  # shard states to drop with the next step
        self._next_step_id = 0
        self.num_preemptions = 0  # since start, for metrics
        self.num_prefix_hit_tokens = 0  # prompt tokens read from the prefix cache, since start
        self._steps_without_admission = 0
        self.step_costs = StepCostModel()  # the engine feeds it each step's measured forward time

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def add(self, request: Request) -> None:
        self.waiting.append(request)

    def finish(self, request: Request, status: RequestStatus) -> None:
        """End a request (stop sequence, abort, error): its blocks go back, and the KV cache
        manager forgets it."""
        assert status.is_finished
        if request.status == RequestStatus.WAITING:
            self.waiting.remove(request)
        elif request.status == RequestStatus.RUNNING:
            self._release(request)
        self.kv_cache_manager.free(request)
        request.status = status

    def schedule(self) -> StepPlan:
        """Choose the next step's work; allocates the blocks it needs."""
        budget = full_budget = self.config.max_batch_prefill_tokens
        allowance = self._prefill_allowance()
        running: list[ScheduledRequest] = []
        num_preemptions = self.num_preemptions
        for request in list(self.running):
            if request.status != RequestStatus.RUNNING:
                continue  # preempted earlier in this loop
            if self._is_done_but_in_flight(request):
                continue  # its last token is in flight: it will finish by length
            num_tokens = request.num_tokens + request.num_pending_outputs - request.num_computed_tokens
            if num_tokens > 1:  # prompt chunk
                num_tokens = self._chunk(
                    request, request.num_computed_tokens, num_tokens, budget, allowance, full_budget
                )
                if num_tokens == 0:
                    continue
            new_block_ids = self._allocate_or_preempt(request, num_tokens)
            if new_block_ids is None:
                continue
            if num_tokens > 1:
                budget -= num_tokens
                allowance -= self._chunk_seconds(request.num_computed_tokens, num_tokens)
            running.append(self._commit(request, num_tokens, False, new_block_ids))
        new: list[ScheduledRequest] = []
        may_admit = self._may_admit()  # decided on the batch as it was before this step
        # After a preemption, admitting newer requests would only evict them again.
        while (
            self.waiting
            and may_admit
            and self.num_preemptions == num_preemptions
            and budget > 0
            and len(self.running) < self.config.max_batch_size
        ):
            request = self.waiting[0]  # a waiting request holds no blocks and has computed nothing
            kv = self.kv_cache_manager
            num_encoder = len(request.encoder_ids)  # encoded in this step: part of its prompt work
            if num_encoder > budget and budget < full_budget:
                break
            budget -= num_encoder
            cached, num_cached = kv.get_computed_blocks(request)
            num_tokens = self._chunk(  # a decoder's first token is computed even if its encoder took the budget
                request, num_cached, request.num_tokens - num_cached, max(budget, 1), allowance, full_budget
            )
            if num_tokens == 0 or kv.allocate_slots(request, num_tokens, cached) is None:
                break
            self.waiting.popleft()
            request.num_computed_tokens = num_cached
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            self.num_prefix_hit_tokens += num_cached
            budget -= num_tokens
            allowance -= self._chunk_seconds(num_cached, num_tokens)
            new.append(self._commit(request, num_tokens, True, kv.block_ids(request), kv.encoder_block_ids(request)))
        self._steps_without_admission = 0 if new else self._steps_without_admission + 1
        scheduled = new + running
        for s in scheduled:
            s.request.is_on_shard = True
        if not scheduled:  # nothing is sent: the forget list waits for the next step
            return StepPlan(self._next_step_id, [], [])
        plan = StepPlan(self._next_step_id, scheduled, self._forget)
        self._next_step_id += 1
        self._forget = []
        return plan

    def update(
        self, plan: StepPlan, token_ids: dict[int, int], grammar_completed: frozenset[int] = frozenset()
    ) -> list[Request]:
        """Apply a step's results; returns the requests that received a token, in plan order.

        A request is finished by length first (TGI's order), then by EOS or one of its stop
        tokens, then by its grammar completing with this token (`grammar_completed`: request
        ids); finished requests release their blocks.
        """
        produced = []
        for s in plan.scheduled:
            request = s.request
            if request.status != RequestStatus.RUNNING or s.incarnation != request.num_preemptions:
                continue  # finished, aborted or preempted since: the token is dropped
            token_id = token_ids.get(request.req_id)
            if token_id is None:
                continue
            request.num_pending_outputs -= 1
            request.output_ids.append(token_id)
            produced.append(request)
            may_stop = len(request.output_ids) >= request.min_new_tokens
            if len(request.output_ids) >= request.max_new_tokens:
                self.finish(request, RequestStatus.FINISHED_LENGTH)
            elif may_stop and token_id in request.eos_token_ids and not request.ignore_eos:
                self.finish(request, RequestStatus.FINISHED_EOS)
            elif may_stop and token_id in request.stop_token_ids:
                self.finish(request, RequestStatus.FINISHED_STOP_SEQUENCE)
            elif request.req_id in grammar_completed:
                self.finish(request, RequestStatus.FINISHED_EOS)
        return produced

    def _is_done_but_in_flight(self, request: Request) -> bool:
        return len(request.output_ids) + request.num_pending_outputs >= request.max_new_tokens

    def _prefill_allowance(self) -> float:
        """Seconds of prompt chunks the next step may carry: (K - 1) times the predicted time of
        its decodes alone, shared by request count, i.e. scaled up by the number of requests
        with prompt tokens to compute per decoding one (a single long prompt gets K - 1; a burst
        of arrivals is not starved by the few requests still decoding). Unlimited when nothing
        decodes or the cost model is not trained yet."""
        k = self.config.max_prefill_slowdown
        if k <= 0 or not self.step_costs.ready:
            return float("inf")
        decoding, num_prefilling = [], len(self.waiting)
        for r in self.running:
            if r.status != RequestStatus.RUNNING or self._is_done_but_in_flight(r):
                continue
            if r.num_tokens + r.num_pending_outputs - r.num_computed_tokens == 1:
                decoding.append((r.num_computed_tokens, 1))
            else:
                num_prefilling += 1
        decodes = StepWork.total(decoding)
        if not decodes.tokens:
            return float("inf")
        return (k - 1) * self.step_costs.predict(decodes) * max(1.0, num_prefilling / decodes.tokens)

    def _chunk(
        self, request: Request, num_cached: int, num_left: int, budget: int, allowance: float, full_budget: int
    ) -> int:
        """Tokens of a prompt to compute now: within the token budget and, for a long prompt, the
        time allowance; the step's first chunk has at least min_chunk_tokens (budget permitting),
        so every prompt advances."""
        n = min(num_left, budget)
        if allowance != float("inf") and request.num_tokens > self.config.long_prompt_tokens:
            fits = self.step_costs.max_chunk(num_cached, max(allowance, 0.0))
            n = min(n, max(fits, self.config.min_chunk_tokens) if budget == full_budget else fits)
        return max(n, 0)

    def _chunk_seconds(self, num_cached: int, num_tokens: int) -> float:
        if not self.step_costs.ready:
            return 0.0
        work = StepWork.of(num_cached, num_tokens)
        return self.step_costs.predict(work) - self.step_costs.predict(StepWork())

    def _may_admit(self) -> bool:
        c = self.config
        return (
            not self.running
            or len(self.waiting) >= c.waiting_served_ratio * len(self.running)
            or self._steps_without_admission >= c.max_waiting_tokens
        )

    def _commit(
        self, request: Request, num_tokens: int, is_new: bool, new_block_ids: list[int], encoder_block_ids=()
    ) -> ScheduledRequest:
        """Count `num_tokens` as computed by this step, and its sampled token as pending."""
        start = request.num_computed_tokens
        request.num_computed_tokens += num_tokens
        produces_token = request.num_computed_tokens == request.num_tokens + request.num_pending_outputs
        request.num_pending_outputs += produces_token
        return ScheduledRequest(
            request,
            num_tokens,
            is_new,
            new_block_ids,
            start,
            request.num_preemptions,
            produces_token,
            encoder_block_ids,
        )

    def fail_all(self) -> list[Request]:
        """A step failed: end every running request and forget the prefix cache, whose
        blocks that step may have left half-written. Returns the requests ended."""
        failed = list(self.running)
        for request in failed:
            self.finish(request, RequestStatus.FINISHED_ERROR)
        self.kv_cache_manager.clear_prefix_cache()
        return failed

    def _allocate_or_preempt(self, request: Request, num_tokens: int) -> list[int] | None:
        """Blocks for `num_tokens` more tokens of `request`, preempting the newest running
        requests until they fit; None when `request` itself had to be preempted."""
        while (new_block_ids := self.kv_cache_manager.allocate_slots(request, num_tokens)) is None:
            victim = self.running[-1]
            if victim is request and len(self.running) == 1:
                raise MemoryError(f"request {request.req_id} needs more KV blocks than the whole pool")
            self._preempt(victim)
            if victim is request:
                return None
        return new_block_ids

    def requeue_all(self) -> list[Request]:
        """The shards were lost (and are being restarted): every running request goes back to the
        front of the queue, oldest first, to be recomputed from its prompt and the tokens it
        generated, as after a preemption; tokens of steps in flight are dropped, and what the shards
        held (their request state, the prefix cache) is forgotten. Returns the requests requeued."""
        requeued = list(self.running)
        for request in reversed(requeued):
            self._requeue(request)
        self._forget.clear()  # the new shards hold nothing to forget
        self.kv_cache_manager.clear_prefix_cache()
        return requeued

    def _preempt(self, request: Request) -> None:
        self._requeue(request)
        self.num_preemptions += 1

    def _requeue(self, request: Request) -> None:
        """Free a running request's blocks and put it at the front of the queue, to be recomputed."""
        self._release(request)
        self.kv_cache_manager.free(request, preempted=True)
        request.status = RequestStatus.WAITING
        request.num_computed_tokens = request.num_pending_outputs = 0
        request.num_preemptions += 1  # results of the steps in flight are stale
        self.waiting.appendleft(request)

    def _release(self, request: Request) -> None:
        """Take a running request out of the batch; the shards forget it with the next step."""
        self.running.remove(request)
        if request.is_on_shard:
            self._forget.append(request.req_id)
            request.is_on_shard = False
