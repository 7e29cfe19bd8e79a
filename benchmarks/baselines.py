"""`transformers` baselines on the same prompts and lengths, measured like a server would be.

Every baseline greedy-decodes exactly `max_tokens` tokens per request (EOS ignored) and records
the wall-clock arrival of each token, so the metrics are the ones the load generator computes:

- `pipeline`: `pipeline("text-generation")`, one request at a time. Each request's service is
  timed once (a streamer stamps every token); `sequential_server` then replays those service
  traces as a FIFO server with one worker under a closed loop of C clients, so queueing behind
  earlier requests counts in TTFT and latency. A sequential server's service times do not depend
  on C, so one measurement serves every concurrency.
- `static`: `model.generate` on batches of C left-padded prompts (`min_new_tokens =
  max_new_tokens`); a batch starts when the previous one finished (C clients, closed loop).
- `continuous`: transformers' continuous batching (`model.init_continuous_batching`, the manager
  behind `generate_batch`), at most C requests per batch; a closed loop of C clients adds the next
  request when one finishes; token times come from `record_timestamps`.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, pipeline
from transformers.generation.configuration_utils import ContinuousBatchingConfig
from transformers.generation.streamers import BaseStreamer

from benchmarks.metrics import RequestRecord
from benchmarks.workload import RequestSpec

BASELINES = ("pipeline", "static", "continuous")


class TokenClock(BaseStreamer):
    """A `generate` streamer that stamps each generated step (the first `put` is the prompt)."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if self._prompt_seen:
            self.times.append(time.perf_counter())
        self._prompt_seen = True

    def end(self) -> None:
        pass


@dataclass(frozen=True, slots=True)
class ServiceTrace:
    """One request served alone: token arrival offsets and total time, from the call's start (s)."""

    index: int
    prompt_len: int
    token_offsets: list[float]
    total_s: float


def load_model(model_dir: str, device: str = "cpu", dtype: torch.dtype = torch.float32):
    """The model in eval mode, and its tokenizer (left padding, a pad token)."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device).eval()
    tok = AutoTokenizer.from_pretrained(model_dir, padding_side="left")
    tok.pad_token = tok.pad_token or tok.eos_token
    return model, tok


def pipeline_traces(model_dir: str, specs: list[RequestSpec], device: str = "cpu") -> list[ServiceTrace]:
    """Serve each request alone through `pipeline("text-generation")` (text in, text out)."""
    pipe = pipeline("text-generation", model=model_dir, dtype=torch.float32, device=device)
    kwargs = {"do_sample": False, "return_full_text": False, "pad_token_id": pipe.tokenizer.eos_token_id}
    pipe(specs[0].prompt_text[:64], max_new_tokens=4, min_new_tokens=4, **kwargs)  # warm-up, not measured
    traces = []
    for spec in specs:
        if len(pipe.tokenizer(spec.prompt_text)["input_ids"]) != spec.prompt_len:
            raise AssertionError(f"pipeline tokenizes prompt {spec.index} to a different length")
        clock = TokenClock()
        start = time.perf_counter()
        pipe(spec.prompt_text, max_new_tokens=spec.max_tokens, min_new_tokens=spec.max_tokens, streamer=clock, **kwargs)
        total = time.perf_counter() - start
        traces.append(ServiceTrace(spec.index, spec.prompt_len, [t - start for t in clock.times], total))
    return traces


def sequential_server(traces: list[ServiceTrace], concurrency: int) -> tuple[list[RequestRecord], float]:
    """Replay service traces through a one-worker FIFO server under a closed loop of C clients.

    Client slot k sends request j = k, k + C, ... as soon as its previous request finished;
    the server serves requests in order, each starting when both it arrived and the previous
    one finished.
    """
    records, finish, server_free = [], [], 0.0
    for j, trace in enumerate(traces):
        send = finish[j - concurrency] if j >= concurrency else 0.0
        start = max(send, server_free)
        server_free = start + trace.total_s
        finish.append(server_free)
        tokens = [start + t for t in trace.token_offsets]
        records.append(RequestRecord(trace.index, trace.prompt_len, send, tokens, len(tokens)))
    return records, max(finish, default=0.0)


def static_batches(model, tok, specs: list[RequestSpec], concurrency: int) -> tuple[list[RequestRecord], float]:
    """`model.generate` over consecutive batches of C left-padded prompts; a batch runs to its longest output.

    A request's tokens are stamped with the batch's step times up to its own `max_tokens`.
    """
    pad = tok.pad_token_id
    _generate(model, [list(specs[0].prompt_ids[:16])], 4, pad)  # warm-up, not measured
    records: list[RequestRecord] = []
    t0 = time.perf_counter()
    for first in range(0, len(specs), concurrency):
        batch = specs[first : first + concurrency]
        send = time.perf_counter() - t0
        times = _generate(model, [list(s.prompt_ids) for s in batch], max(s.max_tokens for s in batch), pad)
        for s in batch:
            tokens = [t - t0 for t in times[: s.max_tokens]]
            records.append(RequestRecord(s.index, s.prompt_len, send, tokens, len(tokens)))
    return records, time.perf_counter() - t0


def _generate(model, prompts: list[list[int]], new_tokens: int, pad: int) -> list[float]:
    """Greedy `generate` of exactly `new_tokens` on left-padded prompts; returns each step's time."""
    width = max(map(len, prompts))
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=model.device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=model.device)
    clock = TokenClock()
    with torch.inference_mode():
        model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=pad,
            streamer=clock,
        )
    return clock.times


def continuous_batching(
    model, specs: list[RequestSpec], concurrency: int, max_batch_tokens: int = 512, page_size: int = 256
) -> tuple[list[RequestRecord], float]:
    """transformers' continuous batching manager, at most C requests per batch, closed loop of C clients.

    The KV cache is sized for C of the longest requests (on CPU the default would take 90% of RAM).
    """
    longest = max(s.prompt_len + s.max_tokens for s in specs)
    config = ContinuousBatchingConfig(
        page_size=page_size,
        num_blocks=concurrency * math.ceil(longest / page_size) + 2,
        max_batch_tokens=max_batch_tokens,
        max_requests_per_batch=concurrency,
        allow_block_sharing=False,  # random prompts share no prefix; Sluice runs without prefix caching too
    )
    gen = GenerationConfig(do_sample=False, eos_token_id=-1, pad_token_id=model.config.eos_token_id)
    manager = model.init_continuous_batching(generation_config=gen, continuous_batching_config=config)
    manager.start()
    try:
        warm = manager.add_request(list(specs[0].prompt_ids[:16]), max_new_tokens=4, eos_token_id=-1)
        _wait(manager, {warm})
        return _closed_loop(manager, specs, concurrency)
    finally:
        manager.stop(block=True, timeout=30)
        model.destroy_cached_continuous_batching_manager()


def _closed_loop(manager, specs: list[RequestSpec], concurrency: int) -> tuple[list[RequestRecord], float]:
    by_id: dict[str, RequestSpec] = {}
    records: dict[int, RequestRecord] = {}
    pending = iter(specs)
    t0 = time.perf_counter()

    def submit() -> None:
        spec = next(pending, None)
        if spec is not None:
            rid = manager.add_request(
                list(spec.prompt_ids), max_new_tokens=spec.max_tokens, eos_token_id=-1, record_timestamps=True
            )
            by_id[rid] = spec

    for _ in range(concurrency):
        submit()
    while len(records) < len(specs):
        out = manager.get_result(timeout=5)
        if out is None:
            if not manager.is_running():
                raise RuntimeError("continuous batching stopped before every request finished")
            continue
        if not out.is_finished() or out.request_id not in by_id:
            continue
        spec = by_id[out.request_id]
        tokens = [t - t0 for t in out.timestamps or []]
        records[spec.index] = RequestRecord(
            spec.index, spec.prompt_len, out.created_time - t0, tokens, len(out.generated_tokens), out.error
        )
        submit()
    return [records[s.index] for s in specs], time.perf_counter() - t0


def _wait(manager, request_ids: set[str]) -> None:
    while request_ids:
        out = manager.get_result(timeout=60)
        if out is None:
            raise RuntimeError("continuous batching warm-up produced nothing in 60 s")
        if out.is_finished():
            request_ids.discard(out.request_id)
