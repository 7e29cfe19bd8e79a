"""gRPC clients of the shards, and the only router module that touches `pb`.

`ShardedClient` fans every call out to all ranks and answers with rank 0's reply; an error
from any rank fails the call. A `ShardError` says whether a shard was lost (its process is gone:
the connection broke or is refused), which a restart of the shard group can mend, or whether a
step failed or timed out on shards that are still there.
"""

import asyncio
from dataclasses import dataclass

import grpc

from router.core.scheduler import StepPlan
from router.pb import shard_pb2 as pb
from router.pb import shard_pb2_grpc


class ShardError(RuntimeError):
    """A call to the shards failed. `lost`: a shard is unreachable (its connection broke or is
    refused: UNAVAILABLE), so the group must be restarted before it can serve again; `timed_out`: a
    step took longer than the step timeout (the shard may be stuck, but it is there). Neither: the
    shards answered with an error, or a stream ended; `ShardedClient.unreachable` tells whether one
    of them is gone nonetheless (the survivors of a broken group fail their collectives first)."""

    def __init__(self, message: str, *, lost: bool = False, timed_out: bool = False):
        super().__init__(message)
        self.lost = lost
        self.timed_out = timed_out


# A shard that is gone: its socket refuses connections or the connection broke mid-call.
_LOST_CODES = frozenset({grpc.StatusCode.UNAVAILABLE})

# Reconnect soon after a shard group restarts: gRPC's default backoff grows to two minutes.
_CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", 256 << 20),
    ("grpc.max_send_message_length", 256 << 20),
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
]


def _rpc_error(address: str, e: grpc.aio.AioRpcError) -> ShardError:
    return ShardError(f"shard {address}: {e.details()}", lost=e.code() in _LOST_CODES)


@dataclass(frozen=True, slots=True)
class WarmupSpec:
    """What the router asks of every warmup: the largest prefill and batch, and a cap on the KV blocks (0: none)."""

    max_batch_prefill_tokens: int
    max_batch_size: int
    max_num_blocks: int


@dataclass(frozen=True, slots=True)
class ModelInfo:
    architecture: str
    dtype: str
    device_type: str
    vocab_size: int
    eos_token_ids: list[int]
    block_size: int
    max_position_embeddings: int
    world_size: int
    quantize: str | None  # None: full precision
    weight_bytes: int  # summed over the ranks
    sliding_window: int = 0  # every layer attends only to this many last positions; 0: some layer sees all
    is_encoder_decoder: bool = False  # prompts are the encoder's input; decoders start from the token below
    decoder_start_token_id: int = 0


@dataclass(frozen=True, slots=True)
class TokenResult:
    token_id: int
    logprob: float
    top_tokens: list[tuple[int, float]]
    grammar_completed: bool = False  # the request's grammar accepts nothing more


@dataclass(frozen=True, slots=True)
class PromptLogprobs:
    first_position: int
    logprobs: list[float]  # of the prompt tokens from first_position on
    top_tokens: list[list[tuple[int, float]]]  # by position, with prompt_top_n: (token id, logprob), best first


@dataclass(frozen=True, slots=True)
class StepResult:
    tokens: dict[int, TokenResult]  # req_id -> the token it produced
    forward_ns: int
    sample_ns: int
    prompt_logprobs: dict[int, PromptLogprobs]  # req_id -> the prompt logprobs computed in the step


def plan_to_pb(plan: StepPlan, trace_context: dict[str, str] | None = None) -> pb.StepRequest:
    msg = pb.StepRequest(step_id=plan.step_id, forget_req_ids=plan.forget_req_ids, trace_context=trace_context)
    for s in plan.scheduled:
        r = s.request
        if s.is_new:
            p = r.sampling
            msg.new_requests.append(
                pb.NewRequest(
                    req_id=r.req_id,
                    token_ids=r.token_ids,
                    num_prompt_tokens=len(r.prompt_ids),
                    num_cached_tokens=s.start_position,
                    num_scheduled_tokens=s.num_scheduled_tokens,
                    block_ids=s.new_block_ids,
                    prompt_logprobs=r.needs_prompt_logprobs,
                    prompt_top_n=r.prompt_top_n,
                    grammar=r.grammar,
                    encoder_token_ids=r.encoder_ids,
                    encoder_block_ids=s.encoder_block_ids,
                    sampling=pb.SamplingParams(
                        do_sample=p.do_sample,
                        temperature=p.temperature,
                        top_k=p.top_k,
                        top_p=p.top_p,
                        typical_p=p.typical_p,
                        repetition_penalty=p.repetition_penalty,
                        frequency_penalty=p.frequency_penalty,
                        seed=p.seed,
                        watermark=p.watermark,
                        top_n_tokens=p.top_n_tokens,
                        raw_logprobs=p.raw_logprobs,
                        presence_penalty=p.presence_penalty,
                        min_p=p.min_p,
                        logit_bias=dict(p.logit_bias),
                    ),
                )
            )
        else:
            msg.running_requests.append(
                pb.RunningRequest(
                    req_id=r.req_id, num_scheduled_tokens=s.num_scheduled_tokens, new_block_ids=s.new_block_ids
                )
            )
    return msg


def result_from_pb(resp: pb.StepResponse) -> StepResult:
    return StepResult(
        tokens={
            o.req_id: TokenResult(
                o.token_id, o.logprob, [(t.token_id, t.logprob) for t in o.top_tokens], o.grammar_completed
            )
            for o in resp.outputs
        },
        forward_ns=resp.forward_ns,
        sample_ns=resp.sample_ns,
        prompt_logprobs={
            p.req_id: PromptLogprobs(
                p.first_position,
                list(p.logprobs),
                [[(t.token_id, t.logprob) for t in top.top_tokens] for top in p.top_tokens],
            )
            for p in resp.prompt_logprobs
        },
    )


class ShardClient:
    """One rank: a channel, its stub, and a long-lived Step stream."""

    def __init__(self, address: str):
        self.address = address
        self.channel = grpc.aio.insecure_channel(address, options=_CHANNEL_OPTIONS)
        self.stub = shard_pb2_grpc.ShardStub(self.channel)
        self._stream = None

    async def send(self, request: pb.StepRequest) -> None:
        if self._stream is None:
            self._stream = self.stub.Step()
        try:
            await self._stream.write(request)
        except grpc.aio.AioRpcError as e:
            self._stream = None
            raise _rpc_error(self.address, e) from e
        except grpc.aio.UsageError as e:  # the stream ended (a failed step aborted it, or the shard went away)
            self._stream = None
            raise ShardError(f"shard {self.address}: {e}") from e

    async def receive(self) -> pb.StepResponse:
        """The response to the oldest step sent and not yet answered."""
        if self._stream is None:
            raise ShardError(f"shard {self.address}: no step stream")
        try:
            response = await self._stream.read()
        except grpc.aio.AioRpcError as e:
            self._stream = None
            raise _rpc_error(self.address, e) from e
        if response is grpc.aio.EOF:  # the shard is stopping, or the stream was ended: whether it is gone, ask
            self._stream = None
            raise ShardError(f"shard {self.address} closed its step stream")
        return response

    async def is_reachable(self, timeout_s: float) -> bool:
        """False if the shard refuses or drops a Health call (gone); True if it answers or is merely slow."""
        try:
            await self.stub.Health(pb.HealthRequest(), timeout=timeout_s)
        except grpc.aio.AioRpcError as e:
            return e.code() not in _LOST_CODES
        return True

    def reset_stream(self) -> None:
        if self._stream is not None:
            self._stream.cancel()
            self._stream = None


class ShardedClient:
    def __init__(self, addresses: list[str]):
        self.clients = [ShardClient(a) for a in addresses]

    async def _all(self, call):
        try:
            return await asyncio.gather(*(call(c) for c in self.clients))
        except grpc.aio.AioRpcError as e:
            raise ShardError(f"{e.code().name}: {e.details()}", lost=e.code() in _LOST_CODES) from e

    async def wait_ready(self, timeout_s: float) -> None:
        await asyncio.gather(*(asyncio.wait_for(c.channel.channel_ready(), timeout_s) for c in self.clients))

    async def info(self) -> ModelInfo:
        responses = await self._all(lambda c: c.stub.Info(pb.InfoRequest()))
        r = responses[0]
        return ModelInfo(
            r.architecture,
            r.dtype,
            r.device_type,
            r.vocab_size,
            list(r.eos_token_ids),
            r.block_size,
            r.max_position_embeddings,
            r.world_size,
            r.quantize or None,
            sum(x.weight_bytes for x in responses),
            r.sliding_window,
            r.is_encoder_decoder,
            r.decoder_start_token_id,
        )

    async def health(self, timeout_s: float = 5.0) -> None:
        await self._all(lambda c: c.stub.Health(pb.HealthRequest(), timeout=timeout_s))

    async def warmup(self, spec: WarmupSpec) -> int:
        """Size every rank's KV cache; returns the number of blocks all ranks have."""
        request = pb.WarmupRequest(
            max_batch_prefill_tokens=spec.max_batch_prefill_tokens,
            max_batch_size=spec.max_batch_size,
            max_num_blocks=spec.max_num_blocks,
        )
        responses = await self._all(lambda c: c.stub.Warmup(request))
        return min(r.num_blocks for r in responses)

    async def unreachable(self, timeout_s: float = 2.0) -> list[str]:
        """The addresses of the ranks that are gone (see ShardClient.is_reachable)."""
        reachable = await asyncio.gather(*(c.is_reachable(timeout_s) for c in self.clients))
        return [c.address for c, ok in zip(self.clients, reachable) if not ok]

    def reset_streams(self) -> None:
        """Drop every rank's step stream (steps in flight are abandoned); the next step opens new ones."""
        for c in self.clients:
            c.reset_stream()

    async def clear_cache(self, timeout_s: float | None = 30.0) -> None:
        """Drop every rank's request state and open fresh step streams (None: no deadline)."""
        for c in self.clients:
            c.reset_stream()
        await self._all(lambda c: c.stub.ClearCache(pb.ClearCacheRequest(), timeout=timeout_s))

    async def send(self, plan: StepPlan, trace_context: dict[str, str] | None = None) -> None:
        """Queue a step on every rank's stream; steps run in the order they are sent."""
        request = plan_to_pb(plan, trace_context)
        await asyncio.gather(*(c.send(request) for c in self.clients))

    async def receive(self, timeout_s: float | None = None) -> StepResult:
        """Rank 0's result for the oldest step in flight. ShardError on any rank's failure, or
        when the ranks take longer than `timeout_s` (the streams must then be reset)."""
        try:
            responses = await asyncio.wait_for(asyncio.gather(*(c.receive() for c in self.clients)), timeout_s)
        except TimeoutError:
            raise ShardError(f"a step took longer than {timeout_s:g}s", timed_out=True) from None
        return result_from_pb(responses[0])

    async def close(self) -> None:
        for c in self.clients:
            c.reset_stream()
            await c.channel.close()
