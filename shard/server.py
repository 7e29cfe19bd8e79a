"""gRPC servicer: protobuf <-> step dataclasses, and the only shard module that touches `pb`."""

import asyncio
import logging
import os
import threading
from concurrent.futures import ThreadPoolExecutor

import grpc

from shard.pb import shard_pb2 as pb
from shard.pb import shard_pb2_grpc
from shard.runner import ModelRunner
from shard.sampler import SamplingParams
from shard.step import NewRequest, RunningRequest, StepInput, StepOutput
from shard.tracing import start_step_span

log = logging.getLogger(__name__)


def sampling_from_pb(p: pb.SamplingParams) -> SamplingParams:
    return SamplingParams(
        do_sample=p.do_sample,
        temperature=p.temperature or 1.0,
        top_k=p.top_k,
        top_p=p.top_p or 1.0,
        typical_p=p.typical_p or 1.0,
        repetition_penalty=p.repetition_penalty or 1.0,
        frequency_penalty=p.frequency_penalty,
        seed=p.seed,
        watermark=p.watermark,
        top_n_tokens=p.top_n_tokens,
        raw_logprobs=p.raw_logprobs,
        presence_penalty=p.presence_penalty,
        min_p=p.min_p,
        logit_bias=tuple(sorted(p.logit_bias.items())),
    )


def step_from_pb(req: pb.StepRequest) -> StepInput:
    return StepInput(
        step_id=req.step_id,
        new_requests=[
            NewRequest(
                r.req_id,
                list(r.token_ids),
                r.num_cached_tokens,
                r.num_scheduled_tokens,
                list(r.block_ids),
                sampling_from_pb(r.sampling),
                r.prompt_logprobs,
                r.num_prompt_tokens or len(r.token_ids),
                r.grammar,
                r.prompt_top_n,
                list(r.encoder_token_ids),
                list(r.encoder_block_ids),
            )
            for r in req.new_requests
        ],
        running_requests=[
            RunningRequest(r.req_id, r.num_scheduled_tokens, list(r.new_block_ids)) for r in req.running_requests
        ],
        forget_req_ids=list(req.forget_req_ids),
    )


def step_to_pb(out: StepOutput) -> pb.StepResponse:
    return pb.StepResponse(
        step_id=out.step_id,
        outputs=[
            pb.TokenOutput(
                req_id=o.req_id,
                token_id=o.token_id,
                logprob=o.logprob,
                top_tokens=[pb.TopToken(token_id=t, logprob=lp) for t, lp in o.top_tokens],
                grammar_completed=o.grammar_completed,
            )
            for o in out.outputs
        ],
        forward_ns=out.forward_ns,
        sample_ns=out.sample_ns,
        prompt_logprobs=[
            pb.PromptLogprobs(
                req_id=p.req_id,
                first_position=p.first_position,
                logprobs=p.logprobs,
                top_tokens=[
                    pb.TopTokens(top_tokens=[pb.TopToken(token_id=t, logprob=lp) for t, lp in position])
                    for position in p.top_tokens
                ],
            )
            for p in out.prompt_logprobs
        ],
    )


class ShardServicer(shard_pb2_grpc.ShardServicer):
    def __init__(self, runner: ModelRunner, executor: ThreadPoolExecutor):
        self.runner = runner
        self.executor = executor  # the model thread (see model_thread)

    async def _run(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    async def Info(self, request, context):
        r = self.runner
        return pb.InfoResponse(
            architecture=r.hf_config.architectures[0],
            dtype=str(r.dtype).removeprefix("torch."),
            device_type=r.device.type,
            vocab_size=r.hf_config.vocab_size,
            eos_token_ids=r.eos_token_ids,
            block_size=r.config.block_size,
            max_position_embeddings=r.max_positions,
            world_size=r.config.world_size,
            rank=r.config.rank,
            quantize=r.quantization.name or "",
            weight_bytes=r.weight_bytes,
            sliding_window=r.sliding_window,
            is_encoder_decoder=r.is_encoder_decoder,
            decoder_start_token_id=r.decoder_start_token_id,
        )

    async def Health(self, request, context):
        self.runner.health()
        return pb.HealthResponse()

    async def Warmup(self, request, context):
        num_blocks = await self._run(
            self.runner.warmup, request.max_batch_prefill_tokens, request.max_batch_size, request.max_num_blocks
        )
        return pb.WarmupResponse(num_blocks=num_blocks, block_bytes=self.runner.block_bytes)

    async def ClearCache(self, request, context):
        await self._run(self.runner.clear)
        return pb.ClearCacheResponse()

    async def Step(self, request_iterator, context):
        """Run each step the router sends, in order, answering each in turn.

        Steps are read and queued on the model thread as they arrive, so that with the router's
        next step already sent the model thread goes straight from one step to the next: the
        asyncio handoffs and protobuf work of the answer and the next request overlap a forward
        instead of sitting between two. Once a step fails or the stream ends, the steps queued
        behind it are skipped, as if never read."""
        stopped = threading.Event()  # set on the model thread, before it takes the next step

        def run(step: StepInput) -> StepOutput | None:
            if stopped.is_set():
                return None
            try:
                return self.runner.step(step)
            except BaseException:
                stopped.set()
                raise

        queued: asyncio.Queue = asyncio.Queue()
        loop = asyncio.get_running_loop()

        async def read() -> None:  # queues (step, span, its result to come), then None; or what failed
            try:
                await read_steps()
            except Exception as e:
                queued.put_nowait(e)
            else:
                queued.put_nowait(None)

        async def read_steps() -> None:
            async for request in request_iterator:
                step = step_from_pb(request)
                span = start_step_span(
                    dict(request.trace_context),
                    {
                        "step_id": step.step_id,
                        "num_new": len(step.new_requests),
                        "num_running": len(step.running_requests),
                    },
                )
                queued.put_nowait((step, span, loop.run_in_executor(self.executor, run, step)))

        reader = asyncio.ensure_future(read())
        try:
            while (item := await queued.get()) is not None:
                if isinstance(item, Exception):
                    raise item
                step, span, result = item
                try:
                    out = await result
                except Exception as e:  # the router fails the step's requests and forgets them
                    refused = isinstance(e, ValueError)  # a malformed step, refused before it ran
                    log.error("step %d refused: %s", step.step_id, e) if refused else log.exception(
                        "step %d failed", step.step_id
                    )
                    span.record_exception(e)
                    span.end()
                    code = grpc.StatusCode.INVALID_ARGUMENT if refused else grpc.StatusCode.INTERNAL
                    await context.abort(code, f"{type(e).__name__}: {e}")
                span.set_attributes({"forward_ns": out.forward_ns, "sample_ns": out.sample_ns})
                span.end()
                yield step_to_pb(out)
        finally:
            stopped.set()
            reader.cancel()


def model_thread() -> ThreadPoolExecutor:
    """The one thread that makes every torch call, from loading the model to each step, in
    arrival order, while the event loop stays free.

    One thread, not merely one at a time: OpenMP keeps a thread team per calling thread, and once
    a process holds more OpenMP threads than cores, libgomp stops spinning at barriers and sleeps
    instead. Loading the model on the main thread and stepping on this one made every CPU decode
    step ~25% slower (hundreds of futex sleeps per step)."""
    return ThreadPoolExecutor(max_workers=1, thread_name_prefix="model")


async def serve(runner: ModelRunner, executor: ThreadPoolExecutor, address: str, stop: asyncio.Event) -> None:
    """Serve until `stop` is set; `executor` is the thread that built `runner`."""
    server = grpc.aio.server(
        options=[("grpc.max_receive_message_length", 256 << 20), ("grpc.max_send_message_length", 256 << 20)]
    )
    shard_pb2_grpc.add_ShardServicer_to_server(ShardServicer(runner, executor), server)
    if address.startswith("unix://"):
        path = address.removeprefix("unix://")
        if os.path.exists(path):
            os.unlink(path)
        old_umask = os.umask(0o177)  # socket readable and writable by its owner only
        try:
            server.add_insecure_port(address)
            await server.start()
        finally:
            os.umask(old_umask)
    else:
        server.add_insecure_port(address)
        await server.start()
    log.info("shard %d serving on %s", runner.config.rank, address)
    await stop.wait()
    await server.stop(grace=1)
