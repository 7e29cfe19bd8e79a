"""ModelRunner: the model, its paged KV cache and the per-request state, one step at a time."""

import dataclasses
import logging
import math
import time
from pathlib import Path

import numpy as np
import torch
from transformers import AutoConfig, GenerationConfig

from shard import dist, kernels, quantization
from shard.compile import compile_forward
from shard.config import ShardConfig
from shard.context import ForwardContext, forward_context
from shard.cuda_graphs import DecodeGraphs
from shard.grammar import Grammars
from shard.input_batch import InputBatch, ModelInputs, prepare_inputs
from shard.layers.attention import Attention
from shard.loader import load_weights
from shard.models import build_model
from shard.sampler import Sampler, SamplerConfig, SamplerOutput, SamplingParams
from shard.step import Batch, PromptLogprobs, RequestState, StepInput, StepOutput, TokenOutput

log = logging.getLogger(__name__)


def resolve_device(config: ShardConfig) -> torch.device:
    if config.device != "auto":
        return torch.device(config.device)
    return torch.device(f"cuda:{config.rank}") if torch.cuda.is_available() else torch.device("cpu")


def cpu_has_fast_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 natively (AVX512-BF16 or AMX), where bf16 linears run
    about twice as fast as float32 ones; elsewhere bf16 is emulated and slower."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(f in flags.split() for f in ("avx512_bf16", "amx_bf16"))


def resolve_dtype(name: str, device: torch.device, hf_config) -> torch.dtype:
    if name != "auto":
        return getattr(torch, name)
    if device.type == "cpu":
        return torch.bfloat16 if cpu_has_fast_bf16() else torch.float32
    return (
        torch.float16 if str(getattr(hf_config, "torch_dtype", "")) in ("float16", "torch.float16") else torch.bfloat16
    )


def eos_token_ids(model_dir: Path, hf_config) -> list[int]:
    ids = []
    try:
        ids.append(GenerationConfig.from_pretrained(model_dir).eos_token_id)
    except OSError:
        pass
    ids.append(getattr(hf_config, "eos_token_id", None))
    flat = {i for x in ids if x is not None for i in (x if isinstance(x, list) else [x])}
    return sorted(flat)


def decoder_start_token_id(model_dir: Path, hf_config) -> int:
    """The token an encoder-decoder model's decoder starts from: the config's or the generation
    config's, else the padding token (T5's convention, as transformers falls back to); 0 for a
    decoder-only model."""
    if not getattr(hf_config, "is_encoder_decoder", False):
        return 0
    try:
        generation = GenerationConfig.from_pretrained(model_dir)
    except OSError:
        generation = None
    for value in (
        getattr(hf_config, "decoder_start_token_id", None),
        getattr(generation, "decoder_start_token_id", None),
        getattr(hf_config, "pad_token_id", None),
    ):
        if value is not None:
            return int(value)
    raise ValueError(f"{model_dir}: an encoder-decoder model without decoder_start_token_id or pad_token_id")


class ModelRunner:
    def __init__(self, config: ShardConfig):
        self.config = config
        self.device = resolve_device(config)
        self.hf_config = AutoConfig.from_pretrained(config.model_dir)
        self.dtype = resolve_dtype(config.dtype, self.device, self.hf_config)
        self.kernel_backend = kernels.select_backend(self.device, config.compile_cache_dir)
        target = quantization.Target(self.device, self.dtype, cpu_gemm=config.cpu_gemm)
        self.quantization = quantization.resolve(config.quantize, self.hf_config, target)
        default_dtype = torch.get_default_dtype()
        torch.set_default_dtype(self.dtype)
        try:
            with torch.device(self.device):
                self.model = build_model(self.hf_config, self.quantization)
        finally:
            torch.set_default_dtype(default_dtype)
        load_weights(self.model, config.model_dir)
        for module in self.model.modules():
            if hasattr(module, "process_weights_after_loading"):
                module.process_weights_after_loading()
        self.weight_bytes = quantization.weight_bytes(self.model)
        log.info(
            "weights: %s, %.1f MiB on this rank (quantization: %s)",
            str(self.dtype).removeprefix("torch."),
            self.weight_bytes / 2**20,
            self.quantization.describe(),
        )
        self.attention_layers = [m for m in self.model.modules() if isinstance(m, Attention)]
        self.is_encoder_decoder = getattr(self.model, "is_encoder_decoder", False)
        self.decoder_start_token_id = decoder_start_token_id(config.model_dir, self.hf_config)
        self.compiled = self.device.type == "cpu" and not config.enforce_eager
        self._model_forward = compile_forward(self.model, config.compile_cache_dir) if self.compiled else self.model
        self.sampler = Sampler(SamplerConfig(config.watermark_gamma, config.watermark_delta))
        self.eos_token_ids = eos_token_ids(config.model_dir, self.hf_config)
        # Rank 0 decides the tokens (it samples, then broadcasts them), so it alone keeps grammar matchers.
        self.grammars = (
            Grammars(config.model_dir, self.hf_config.vocab_size, self.eos_token_ids, self.device)
            if dist.tp_rank() == 0
            else None
        )
        self.batch = InputBatch(  # + the token sampled last
            self.max_positions + 1, config.block_size, self.device, is_encoder_decoder=self.is_encoder_decoder
        )
        self.kv_caches: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.num_blocks = 0
        self.decode_graphs: DecodeGraphs | None = None

    @property
    def max_positions(self) -> int:
        """Longest sequence served: the model's positions (a sliding window limits what each query
        attends to, not how far a sequence goes); 2048 where the config sets none (BLOOM: ALiBi has
        no table to run out of, 2048 is its training length and vLLM's default)."""
        return getattr(self.hf_config, "max_position_embeddings", None) or 2048

    @property
    def sliding_window(self) -> int:
        """The window every attention layer has (each query sees its last that many positions; the
        widest, should they differ), or 0 when some layer attends to the whole sequence. With one,
        the router gives back the blocks of a request that slid out of it."""
        windows = [a.sliding_window for a in self.attention_layers]
        return 0 if 0 in windows else max(windows)

    # -- KV cache -------------------------------------------------------------------------
    @property
    def block_bytes(self) -> int:
        a = self.attention_layers[0]
        return (
            2 * len(self.attention_layers) * self.config.block_size * a.num_kv_heads * a.head_dim * self.dtype.itemsize
        )

    def _allocate_kv_cache(self, num_blocks: int) -> None:
        a = self.attention_layers[0]
        shape = (2, len(self.attention_layers), num_blocks, self.config.block_size, a.num_kv_heads, a.head_dim)
        # Zeroed: the reference decode reads padded positions (masked, but 0 * NaN would be NaN).
        cache = torch.zeros(shape, dtype=self.dtype, device=self.device)
        self.kv_caches = [(cache[0, i], cache[1, i]) for i in range(len(self.attention_layers))]
        self.num_blocks = num_blocks

    def warmup(self, max_prefill_tokens: int, max_batch_size: int, max_num_blocks: int) -> int:
        """Run the largest prefill once, then size and allocate the KV cache; returns its blocks.

        On a CPU the forward is first compiled on a small prompt, then the largest prefill and
        decode batches of 1, 2, 4 ... max_batch_size rows run once, so that the first requests
        find oneDNN's kernels for those shapes made and the allocator's memory faulted in."""
        num_tokens = max(2, min(max_prefill_tokens, self.max_positions))
        bs = self.config.block_size
        n = -(-num_tokens // bs)
        self._allocate_kv_cache(2 * n if self.is_encoder_decoder else n)

        def single(length: int) -> Batch:  # one request of `length` tokens (encoding the longest input first)
            encoder = (list(range(num_tokens)), list(range(n, 2 * n))) if self.is_encoder_decoder else ()
            return Batch.single(list(range(length)), list(range(n)), *encoder)

        if self.device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
        start = time.perf_counter()
        if self.compiled:
            self.forward(single(min(num_tokens, 64)))
            log.info("compiled the forward in %.1f s", time.perf_counter() - start)
        rows = max(1, min(max_batch_size, num_tokens))
        self.forward(single(num_tokens), sample_rows_override=torch.arange(num_tokens - rows, num_tokens))
        if self.device.type == "cpu":
            self._warm_decode_batches(max_batch_size)
            log.info("warmed the shapes in %.1f s", time.perf_counter() - start)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            total = torch.cuda.get_device_properties(self.device).total_memory
            peak = torch.cuda.max_memory_allocated(self.device)
            budget = int(total * self.config.cuda_memory_fraction) - peak
        else:
            budget = self.config.cpu_kv_cache_bytes
        num_blocks = max(budget // self.block_bytes, 0)
        if max_num_blocks:
            num_blocks = min(num_blocks, max_num_blocks)
        if num_blocks < 2:
            raise RuntimeError(
                f"not enough memory for the KV cache ({budget} bytes left for blocks of {self.block_bytes})"
            )
        self.decode_graphs = None  # they hold the old cache's addresses
        self._allocate_kv_cache(0)  # release the warmup cache first
        self._allocate_kv_cache(num_blocks)
        log.info("KV cache: %d blocks of %d tokens (%.2f GiB)", num_blocks, bs, num_blocks * self.block_bytes / 2**30)
        buckets = [b for b in self.config.cuda_graphs if b <= max_batch_size]
        # After the cache: the graphs hold its addresses. Cross-attention's metadata has no graph buffers.
        if self.kernel_backend == "triton" and buckets and not self.is_encoder_decoder:
            self.decode_graphs = DecodeGraphs(
                self.model, buckets, self.batch.max_blocks, self.max_positions, self.kv_caches, self.device
            )
        return num_blocks

    def _warm_decode_batches(self, max_batch_size: int) -> None:
        """One decode step at each power-of-two batch size up to `max_batch_size` (and at it),
        every row a short sequence in the warmup cache's first block."""
        sizes = sorted({min(1 << i, max_batch_size) for i in range(max(max_batch_size, 1).bit_length() + 1)})
        length = min(self.config.block_size, self.max_positions)
        for size in sizes:
            encoder = ([0] * length, [0]) if self.is_encoder_decoder else ([], [])
            states = [
                RequestState(-1, [0] * length, length, length - 1, [0], SamplingParams(), False, *encoder)
                for _ in range(size)
            ]
            self.forward(Batch(states, [1] * size))

    def clear(self) -> None:
        self.batch.clear()
        if self.grammars is not None:
            self.grammars.clear()

    # -- forward --------------------------------------------------------------------------
    def forward(self, batch: Batch, sample_rows_override=None) -> torch.Tensor | None:
        """Logits [S, vocab] of the rows of `batch` that sample (rank 0; None elsewhere), for requests
        described in full by `batch` rather than held by the shard (tests, warmup). A request of an
        encoder-decoder model that computes from the start is encoded first."""
        encoder = None
        if self.is_encoder_decoder:
            for s in batch.states:
                if s.num_computed_tokens == 0:
                    self._encode(s.encoder_token_ids, s.encoder_block_ids)
            encoder = batch.encoder_arrays()
        inputs = prepare_inputs(*batch.arrays(), self.config.block_size, self.kv_caches, self.batch.stage, encoder)
        return self._forward(inputs, sample_rows_override)[0]

    def _encode(self, token_ids: list[int], block_ids: list[int]) -> None:
        """Run the encoder over one request's input `token_ids`, storing every decoder layer's
        cross-attention K/V of it in the request's encoder blocks `block_ids`."""
        bs, positions = self.config.block_size, np.arange(len(token_ids))
        slots = np.asarray(block_ids, dtype=np.int64)[positions // bs] * bs + positions % bs
        slots_t = torch.from_numpy(slots).to(self.device)
        with torch.inference_mode(), forward_context(ForwardContext(slots_t, None, None, self.kv_caches)):
            self.model.encode(torch.tensor(token_ids, device=self.device), slots_t)

    def _forward(self, inputs: ModelInputs, sample_rows_override=None):
        """(logits [S, vocab] of the sampling rows or None off rank 0, hidden states [T, hidden])."""
        sample_rows = inputs.sample_rows if sample_rows_override is None else sample_rows_override.to(self.device)
        graphs, ctx = self.decode_graphs, inputs.context
        bucket = graphs.bucket(inputs.num_tokens) if graphs is not None and ctx.extend is None else None
        with torch.inference_mode(), forward_context(ctx):
            if bucket is not None:
                hidden = graphs.run(bucket, inputs.input_ids, inputs.positions, ctx)  # [T, hidden]
            else:
                kernels.begin_step(ctx)
                hidden = self._model_forward(inputs.input_ids, inputs.positions)  # [T, hidden]
            return self.model.compute_logits(hidden[sample_rows]), hidden

    @torch.inference_mode()
    def _prompt_logprobs(self, inputs: ModelInputs, hidden: torch.Tensor) -> list[PromptLogprobs]:
        """Logprobs of the prompt tokens that follow this step's positions, and the prompt_top_n most
        likely tokens there, for requests that asked; every rank takes part (the LM head gathers to
        rank 0), rank 0 gets the values. Always under the model's own distribution (log_softmax of
        the logits, as TGI's prefill details, OpenAI's echo and vLLM's prompt logprobs are): there is
        no processed distribution at a prompt position, where nothing was sampled."""
        b, rows, targets, spans, offset = self.batch, [], [], [], 0
        for row, n in zip(inputs.rows.tolist(), inputs.num_scheduled.tolist()):
            start = int(b.num_computed[row])
            end = min(start + n, int(b.num_prompt_tokens[row]) - 1)
            if b.prompt_logprobs[row] and end > start:  # the row of position p predicts token p + 1
                rows.append(np.arange(offset, offset + end - start))
                targets.append(b.token_ids[row, start + 1 : end + 1])
                spans.append((int(b.req_ids[row]), start + 1, end - start, int(b.prompt_top_n[row])))
            offset += n
        if not spans:
            return []
        rows_t = torch.from_numpy(np.concatenate(rows)).to(self.device)
        targets_t = torch.from_numpy(np.concatenate(targets)).to(self.device)
        max_top_n = min(max(span[3] for span in spans), self.hf_config.vocab_size)
        values, top_values, top_ids = [], [], []
        for i in range(0, len(rows_t), 512):  # bounded [512, vocab] logits at a time
            logits = self.model.compute_logits(hidden[rows_t[i : i + 512]])
            if logits is None:
                continue
            logprobs = logits.log_softmax(-1)  # [<=512, vocab]
            values.append(logprobs.gather(-1, targets_t[i : i + 512, None]).squeeze(-1))
            if max_top_n:
                top = logprobs.topk(max_top_n, dim=-1)
                top_values.append(top.values)
                top_ids.append(top.indices)
        if not values:
            return []
        flat, out, at = torch.cat(values).tolist(), [], 0
        tops = list(zip(torch.cat(top_ids).tolist(), torch.cat(top_values).tolist())) if max_top_n else []
        for req_id, first, count, top_n in spans:
            top_tokens = [list(zip(ids[:top_n], lps[:top_n])) for ids, lps in tops[at : at + count]] if top_n else []
            out.append(PromptLogprobs(req_id, first, flat[at : at + count], top_tokens))
            at += count
        return out

    # -- steps ----------------------------------------------------------------------------
    def _check_step(self, step: StepInput) -> None:
        """Refuse (ValueError) a step that would read or write outside what it owns, before it
        changes any state: on CUDA an out-of-range index kills the whole process's context."""
        vocab = self.hf_config.vocab_size
        for r in step.new_requests:
            if not 0 <= r.num_prompt_tokens <= len(r.token_ids):
                raise ValueError(f"request {r.req_id}: {r.num_prompt_tokens} prompt tokens of {len(r.token_ids)}")
            if any(not 0 <= t < vocab or not math.isfinite(v) for t, v in r.sampling.logit_bias):
                raise ValueError(
                    f"request {r.req_id}: a logit_bias token outside the vocabulary ({vocab}) or not finite"
                )
            self._check_encoder_input(r)
        new = step.new_requests
        self._check_spans(
            [r.req_id for r in new],
            np.fromiter((r.num_cached_tokens for r in new), np.int64, len(new)),
            np.fromiter((r.num_scheduled_tokens for r in new), np.int64, len(new)),
            np.fromiter((len(r.token_ids) for r in new), np.int64, len(new)),
            np.fromiter((len(r.block_ids) for r in new), np.int64, len(new)),
            [r.block_ids for r in new],
        )
        running, b, forgotten = step.running_requests, self.batch, set(step.forget_req_ids)
        if not running:
            return
        rows = [None if r.req_id in forgotten else b.row_of.get(r.req_id) for r in running]
        if None in rows:
            raise ValueError(f"request {running[rows.index(None)].req_id} is not running on this shard")
        self._check_spans(
            [r.req_id for r in running],
            b.num_computed[rows],
            np.fromiter((r.num_scheduled_tokens for r in running), np.int64, len(running)),
            b.num_tokens[rows],
            b.num_blocks[rows] + np.fromiter((len(r.new_block_ids) for r in running), np.int64, len(running)),
            [r.new_block_ids for r in running],
        )

    def _check_spans(self, req_ids: list[int], start, n, num_known, num_blocks, new_block_ids) -> None:
        """Each request computes tokens start .. start + n of the num_known it has, within its
        num_blocks blocks and the positions served, and every block id in new_block_ids (those not
        checked by an earlier step) lies in the cache. Arrays [R] int64, a row a request, checked at
        once (a decode step has a row per running sequence); the first failing request is named,
        with its first failed condition."""
        end = start + n
        bs, served, cache_blocks = self.config.block_size, self.max_positions, self.num_blocks
        failures = [
            (n < 1, lambda i: f"{n[i]} tokens scheduled; every request computes at least one"),
            ((start < 0) | (end > num_known), lambda i: f"tokens {start[i]}..{end[i]} scheduled, {num_known[i]} known"),
            (end > num_blocks * bs, lambda i: f"{num_blocks[i]} blocks cannot hold {end[i]} tokens"),
            (
                (num_known > served) | (num_blocks > self.batch.max_blocks),
                lambda i: f"{num_known[i]} tokens exceed the {served} served",
            ),
            (
                np.fromiter((any(not 0 <= x < cache_blocks for x in ids) for ids in new_block_ids), bool, len(req_ids)),
                lambda i: f"a block id outside the cache's {cache_blocks} blocks",
            ),
        ]
        bad = np.logical_or.reduce([failed for failed, _ in failures])
        if bad.any():
            i = int(bad.argmax())
            message = next(describe for failed, describe in failures if failed[i])
            raise ValueError(f"request {req_ids[i]}: {message(i)}")

    def _check_encoder_input(self, r) -> None:
        """An encoder-decoder model's new request `r` brings its encoder input and blocks; no other does."""
        if not self.is_encoder_decoder:
            if r.encoder_token_ids or r.encoder_block_ids:
                raise ValueError(f"request {r.req_id}: an encoder input for a decoder-only model")
            return
        n, blocks, vocab = len(r.encoder_token_ids), r.encoder_block_ids, self.hf_config.vocab_size
        if not 0 < n <= self.max_positions:
            raise ValueError(f"request {r.req_id}: {n} encoder tokens; 1 to {self.max_positions} are served")
        if len(blocks) * self.config.block_size < n or len(blocks) > self.batch.max_blocks:
            raise ValueError(f"request {r.req_id}: {len(blocks)} encoder blocks for {n} encoder tokens")
        if any(not 0 <= x < self.num_blocks for x in blocks):
            raise ValueError(f"request {r.req_id}: an encoder block id outside the cache's {self.num_blocks} blocks")
        if any(not 0 <= t < vocab for t in r.encoder_token_ids):
            raise ValueError(f"request {r.req_id}: an encoder token outside the vocabulary ({vocab})")

    def _apply_step(self, step: StepInput) -> tuple[np.ndarray, np.ndarray]:
        """Forget, add and grow requests as the step says; returns (rows, tokens each computes)."""
        self._check_step(step)
        b = self.batch
        for req_id in step.forget_req_ids:
            b.remove(req_id)
            if self.grammars is not None:
                self.grammars.remove(req_id)
        rows, num_scheduled = [], []
        for r in step.new_requests:
            rows.append(
                b.add(
                    r.req_id,
                    r.token_ids,
                    r.num_cached_tokens,
                    r.block_ids,
                    r.sampling,
                    r.prompt_logprobs,
                    r.num_prompt_tokens,
                    r.prompt_top_n,
                    r.encoder_block_ids,
                    len(r.encoder_token_ids),
                )
            )
            num_scheduled.append(r.num_scheduled_tokens)
            if self.grammars is not None:  # replays the tokens generated before a preemption, if any
                self.grammars.add(r.req_id, r.grammar, r.token_ids[r.num_prompt_tokens or len(r.token_ids) :])
        for r in step.running_requests:
            if r.new_block_ids:
                b.append_blocks(r.req_id, r.new_block_ids)
            rows.append(b.row_of[r.req_id])
            num_scheduled.append(r.num_scheduled_tokens)
        return b.order(np.array(rows, dtype=np.int64), np.array(num_scheduled, dtype=np.int64))

    def step(self, step: StepInput) -> StepOutput:
        """Compute the scheduled tokens of every request and sample where a token is due. The
        grammar masks of constrained requests are filled on the grammar thread during the forward."""
        rows, num_scheduled = self._apply_step(step)
        if not len(rows):
            return StepOutput(step.step_id, [], 0, 0)
        t0 = time.perf_counter_ns()
        for r in step.new_requests:
            if r.encoder_token_ids:
                self._encode(r.encoder_token_ids, r.encoder_block_ids)
        inputs = self.batch.prepare(rows, num_scheduled, self.kv_caches)
        producing = inputs.rows[inputs.produces]
        grammar = self.grammars.start(self.batch.req_ids[producing]) if self.grammars is not None else None
        logits, hidden = self._forward(inputs)
        prompt_logprobs = self._prompt_logprobs(inputs, hidden)
        t1 = time.perf_counter_ns()
        token_ids = torch.empty(len(producing), dtype=torch.int64, device=self.device)
        out = None
        if logits is not None and len(producing):  # rank 0, and someone is due a token
            sampling = self.batch.sampling_batch(producing)
            if grammar is not None:
                sampling = dataclasses.replace(sampling, grammar=grammar.wait())
            out = self.sampler(logits, sampling)
            token_ids = out.token_ids
        dist.broadcast_from_rank0(token_ids)
        sampled = token_ids.tolist()
        completed, reported = grammar.accept(sampled) if grammar is not None else ([False] * len(sampled), sampled)
        outputs = self._outputs(producing, reported, out, completed) if out is not None else []
        self.batch.advance(inputs, sampled)  # as on every rank, even where a failed grammar reports EOS
        return StepOutput(step.step_id, outputs, t1 - t0, time.perf_counter_ns() - t1, prompt_logprobs)

    def _outputs(
        self, producing: np.ndarray, sampled: list[int], out: SamplerOutput, completed: list[bool]
    ) -> list[TokenOutput]:
        """Rank 0's outputs for the rows `producing` [N] that report the tokens `sampled` [N],
        `completed` [N] saying whose grammar admits nothing more."""
        req_ids = self.batch.req_ids[producing].tolist()
        logprobs = out.logprobs.tolist()
        top_ids = out.top_ids.tolist() if out.top_ids is not None else None
        top_logprobs = out.top_logprobs.tolist() if out.top_logprobs is not None else None
        top_n = self.batch.sampling.top_n[producing].tolist()
        outputs = []
        for j in range(len(producing)):
            top = list(zip(top_ids[j][: top_n[j]], top_logprobs[j][: top_n[j]])) if top_n[j] else []
            outputs.append(TokenOutput(req_ids[j], sampled[j], logprobs[j], top, completed[j]))
        return outputs

    def health(self) -> None:
        torch.zeros(1, device=self.device).add_(1).item()
