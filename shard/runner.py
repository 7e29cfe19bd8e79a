"""ModelRunner: the model, its paged KV cache and the per-request state, one step at a time."""

import logging
import time
from pathlib import Path

import torch
from transformers import AutoConfig, GenerationConfig

from shard import dist, kernels
from shard.config import ShardConfig
from shard.context import forward_context
from shard.layers.attention import Attention
from shard.loader import load_weights
from shard.models import build_model
from shard.sampler import Sampler, SamplerConfig, SamplingParams
from shard.step import Batch, PromptLogprobs, RequestState, StepInput, StepOutput, TokenOutput, prepare_inputs

log = logging.getLogger(__name__)


def resolve_device(config: ShardConfig) -> torch.device:
    if config.device != "auto":
        return torch.device(config.device)
    return torch.device(f"cuda:{config.rank}") if torch.cuda.is_available() else torch.device("cpu")


def resolve_dtype(name: str, device: torch.device, hf_config) -> torch.dtype:
    if name != "auto":
        return getattr(torch, name)
    if device.type == "cpu":
        return torch.float32  # this CPU has no fast bf16 matmul
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


class ModelRunner:
    def __init__(self, config: ShardConfig):
        self.config = config
        self.device = resolve_device(config)
        self.hf_config = AutoConfig.from_pretrained(config.model_dir)
        self.dtype = resolve_dtype(config.dtype, self.device, self.hf_config)
        self.kernel_backend = kernels.select_backend(self.device)
        default_dtype = torch.get_default_dtype()
        torch.set_default_dtype(self.dtype)
        try:
            with torch.device(self.device):
                self.model = build_model(self.hf_config)
        finally:
            torch.set_default_dtype(default_dtype)
        load_weights(self.model, config.model_dir)
        if self.device.type == "cpu" and config.cpu_gemm == "onednn":
            packed = [m.pack_for_cpu() for m in self.model.modules() if hasattr(m, "pack_for_cpu")]
            log.info("oneDNN-packed weights: %d of %d linear layers", sum(packed), len(packed))
        self.attention_layers = [m for m in self.model.modules() if isinstance(m, Attention)]
        self.sampler = Sampler(SamplerConfig(config.watermark_gamma, config.watermark_delta))
        self.eos_token_ids = eos_token_ids(config.model_dir, self.hf_config)
        self.states: dict[int, RequestState] = {}
        self.num_blocks = 0

    @property
    def max_positions(self) -> int:
        """Longest sequence served exactly: attention is full, so a sliding window (Mistral v0.1)
        caps it at the window's size rather than letting outputs drift past it."""
        c = self.hf_config
        window = getattr(c, "sliding_window", None) if getattr(c, "use_sliding_window", True) else None
        return min(c.max_position_embeddings, window or c.max_position_embeddings)

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
        for i, layer in enumerate(self.attention_layers):
            layer.k_cache, layer.v_cache = cache[0, i], cache[1, i]
        self.num_blocks = num_blocks

    def warmup(self, max_prefill_tokens: int, max_batch_size: int, max_num_blocks: int) -> int:
        """Run the largest prefill once, then size and allocate the KV cache; returns its blocks."""
        num_tokens = max(1, min(max_prefill_tokens, self.max_positions))
        if self.device.type != "cuda":  # nothing to profile: a small forward only proves the model runs
            num_tokens = min(num_tokens, 64)
        bs = self.config.block_size
        self._allocate_kv_cache(-(-num_tokens // bs))
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
        rows = max(1, min(max_batch_size, num_tokens))
        state = RequestState(-1, [0] * num_tokens, num_tokens, 0, list(range(self.num_blocks)), SamplingParams())
        self.forward(Batch([state], [num_tokens]), sample_rows_override=torch.arange(num_tokens - rows, num_tokens))
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
        self._allocate_kv_cache(0)  # release the warmup cache first
        self._allocate_kv_cache(num_blocks)
        log.info("KV cache: %d blocks of %d tokens (%.2f GiB)", num_blocks, bs, num_blocks * self.block_bytes / 2**30)
        return num_blocks

    def clear(self) -> None:
        self.states.clear()

    # -- steps --------------------------------------------------------------------------
    def forward(self, batch: Batch, sample_rows_override=None):
        """Run the model over `batch`; logits [S, vocab] of the rows that sample (rank 0), else None."""
        return self._forward(batch, sample_rows_override)[0]

    def _forward(self, batch: Batch, sample_rows_override=None):
        """(logits [S, vocab] of the sampling rows or None off rank 0, hidden states [T, hidden])."""
        input_ids, positions, ctx, sample_rows = prepare_inputs(batch, self.config.block_size, self.device)
        if sample_rows_override is not None:
            sample_rows = sample_rows_override.to(self.device)
        with torch.inference_mode(), forward_context(ctx):
            hidden = self.model(input_ids, positions)  # [T, hidden]
            return self.model.compute_logits(hidden[sample_rows]), hidden

    @torch.inference_mode()
    def _prompt_logprobs(self, batch: Batch, hidden: torch.Tensor) -> list[PromptLogprobs]:
        """Logprobs of the prompt tokens that follow this step's positions, for requests that
        asked; every rank takes part (the LM head gathers to rank 0), rank 0 gets the values."""
        rows, targets, spans, offset = [], [], [], 0
        for s, n in zip(batch.states, batch.num_scheduled):
            start, end = s.num_computed_tokens, min(s.num_computed_tokens + n, s.num_prompt_tokens - 1)
            if s.prompt_logprobs and end > start:  # the row of position p predicts token p + 1
                rows += range(offset, offset + end - start)
                targets += s.token_ids[start + 1 : end + 1]
                spans.append((s.req_id, start + 1, end - start))
            offset += n
        values = []
        for i in range(0, len(rows), 512):  # bounded [512, vocab] logits at a time
            logits = self.model.compute_logits(hidden[torch.tensor(rows[i : i + 512], device=self.device)])
            if logits is not None:
                target = torch.tensor(targets[i : i + 512], device=self.device)
                values.append(logits.log_softmax(-1).gather(-1, target[:, None]).squeeze(-1))
        if not values:
            return []
        flat, out, at = torch.cat(values).tolist(), [], 0
        for req_id, first, count in spans:
            out.append(PromptLogprobs(req_id, first, flat[at : at + count]))
            at += count
        return out

    def _check_step(self, step: StepInput) -> None:
        """Refuse (ValueError) a step that would read or write outside what it owns, before it
        changes any state: on CUDA an out-of-range index kills the whole process's context."""
        bs, forgotten = self.config.block_size, set(step.forget_req_ids)

        def check(req_id: int, start: int, n: int, num_known: int, num_blocks: int, new_block_ids) -> None:
            if n < 1:
                raise ValueError(f"request {req_id}: {n} tokens scheduled; every request computes at least one")
            if start < 0 or start + n > num_known:
                raise ValueError(f"request {req_id}: tokens {start}..{start + n} scheduled, {num_known} known")
            if start + n > num_blocks * bs:
                raise ValueError(f"request {req_id}: {num_blocks} blocks cannot hold {start + n} tokens")
            if any(not 0 <= b < self.num_blocks for b in new_block_ids):  # earlier blocks were checked
                raise ValueError(f"request {req_id}: a block id outside the cache's {self.num_blocks} blocks")

        for r in step.new_requests:
            num_blocks = len(r.block_ids)
            check(r.req_id, r.num_cached_tokens, r.num_scheduled_tokens, len(r.token_ids), num_blocks, r.block_ids)
        for r in step.running_requests:
            state = None if r.req_id in forgotten else self.states.get(r.req_id)
            if state is None:
                raise ValueError(f"request {r.req_id} is not running on this shard")
            num_blocks = len(state.block_ids) + len(r.new_block_ids)
            num_known = len(state.token_ids)
            check(r.req_id, state.num_computed_tokens, r.num_scheduled_tokens, num_known, num_blocks, r.new_block_ids)

    def _collect_batch(self, step: StepInput) -> Batch:
        self._check_step(step)
        for req_id in step.forget_req_ids:
            self.states.pop(req_id, None)
        states, num_scheduled = [], []
        for r in step.new_requests:
            state = RequestState(
                r.req_id,
                list(r.token_ids),
                len(r.token_ids),
                r.num_cached_tokens,
                list(r.block_ids),
                r.sampling,
                r.prompt_logprobs,
            )
            self.states[r.req_id] = state
            states.append(state)
            num_scheduled.append(r.num_scheduled_tokens)
        for r in step.running_requests:
            state = self.states[r.req_id]
            state.block_ids += r.new_block_ids
            states.append(state)
            num_scheduled.append(r.num_scheduled_tokens)
        return Batch.ordered(states, num_scheduled)

    def step(self, step: StepInput) -> StepOutput:
        """Compute the scheduled tokens of every request and sample where a token is due."""
        batch = self._collect_batch(step)
        if not batch.states:
            return StepOutput(step.step_id, [], 0, 0)
        t0 = time.perf_counter_ns()
        logits, hidden = self._forward(batch)
        prompt_logprobs = self._prompt_logprobs(batch, hidden)
        t1 = time.perf_counter_ns()
        producing = [i for i in range(len(batch.states)) if batch.produces_token(i)]
        outputs: list[TokenOutput] = []
        token_ids = torch.empty(len(producing), dtype=torch.int64, device=self.device)
        if logits is not None and producing:  # rank 0, and someone is due a token
            states = [batch.states[i] for i in producing]
            out = self.sampler(
                logits,
                [s.sampling for s in states],
                [s.token_ids for s in states],
                [s.num_prompt_tokens for s in states],
            )
            token_ids = out.token_ids
        dist.broadcast_from_rank0(token_ids)
        sampled = token_ids.tolist()
        if logits is not None and producing:
            logprobs = out.logprobs.tolist()
            top_ids = out.top_ids.tolist() if out.top_ids is not None else None
            top_logprobs = out.top_logprobs.tolist() if out.top_logprobs is not None else None
            for j, i in enumerate(producing):
                n = batch.states[i].sampling.top_n_tokens
                top = list(zip(top_ids[j][:n], top_logprobs[j][:n])) if n else []
                outputs.append(TokenOutput(batch.states[i].req_id, sampled[j], logprobs[j], top))
        for state, n in zip(batch.states, batch.num_scheduled):
            state.num_computed_tokens += n
        for j, i in enumerate(producing):
            batch.states[i].token_ids.append(sampled[j])
        return StepOutput(step.step_id, outputs, t1 - t0, time.perf_counter_ns() - t1, prompt_logprobs)

    def health(self) -> None:
        torch.zeros(1, device=self.device).add_(1).item()
