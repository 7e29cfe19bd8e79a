"""What a step asks of the shard (decoded from protobuf in server.py) and the tensors it becomes."""

from dataclasses import dataclass, field

import torch

from shard.context import DecodeMeta, ExtendMeta, ForwardContext
from shard.sampler import SamplingParams


@dataclass(frozen=True, slots=True)
class NewRequest:
    req_id: int
    token_ids: list[int]
    num_cached_tokens: int
    num_scheduled_tokens: int
    block_ids: list[int]
    sampling: SamplingParams
    prompt_logprobs: bool = False


@dataclass(frozen=True, slots=True)
class RunningRequest:
    req_id: int
    num_scheduled_tokens: int
    new_block_ids: list[int]


@dataclass(frozen=True, slots=True)
class StepInput:
    step_id: int
    new_requests: list[NewRequest] = field(default_factory=list)
    running_requests: list[RunningRequest] = field(default_factory=list)
    forget_req_ids: list[int] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class TokenOutput:
    req_id: int
    token_id: int
    logprob: float
    top_tokens: list[tuple[int, float]]


@dataclass(frozen=True, slots=True)
class PromptLogprobs:
    req_id: int
    first_position: int  # logprobs[i] is that of the prompt token at first_position + i
    logprobs: list[float]


@dataclass(frozen=True, slots=True)
class StepOutput:
    step_id: int
    outputs: list[TokenOutput]
    forward_ns: int
    sample_ns: int
    prompt_logprobs: list[PromptLogprobs] = field(default_factory=list)


@dataclass(slots=True)
class RequestState:
    """What the shard keeps about a request between steps."""

    req_id: int
    token_ids: list[int]  # prompt, then every sampled token (appended after each step)
    num_prompt_tokens: int
    num_computed_tokens: int  # tokens whose KV is in the cache
    block_ids: list[int]
    sampling: SamplingParams
    prompt_logprobs: bool = False  # report the logprob of each prompt token as it is computed


@dataclass(frozen=True, slots=True)
class Batch:
    """One step's requests with how many tokens each computes, in execution order: requests
    computing several tokens first, then those computing one (see `ordered`)."""

    states: list[RequestState]
    num_scheduled: list[int]

    @classmethod
    def ordered(cls, states: list[RequestState], num_scheduled: list[int]) -> "Batch":
        """The batch with multi-token requests first (in their order), then single-token ones
        from the shortest sequence to the longest (the decode kernels group rows by length)."""

        def key(i: int) -> tuple[bool, int]:
            single = num_scheduled[i] == 1
            return single, states[i].num_computed_tokens if single else 0

        order = sorted(range(len(states)), key=key)
        return cls([states[i] for i in order], [num_scheduled[i] for i in order])

    @property
    def num_extend_requests(self) -> int:
        return sum(n > 1 for n in self.num_scheduled)

    def produces_token(self, i: int) -> bool:
        """A request samples once it has computed every token it knows."""
        s = self.states[i]
        return s.num_computed_tokens + self.num_scheduled[i] == len(s.token_ids)


def prepare_inputs(batch: Batch, block_size: int, device: torch.device):
    """Build (input_ids [T], positions [T], context, sample_rows [S]) for an ordered `batch`."""
    input_ids, positions, slots, cu_seqlens, context_lens, sample_rows = [], [], [], [0], [], []
    for i, (s, n) in enumerate(zip(batch.states, batch.num_scheduled)):
        start, end = s.num_computed_tokens, s.num_computed_tokens + n
        assert end <= len(s.token_ids), f"request {s.req_id}: scheduled past the known tokens"
        assert end <= len(s.block_ids) * block_size, f"request {s.req_id}: not enough blocks for {end} tokens"
        input_ids += s.token_ids[start:end]
        positions += range(start, end)
        slots += [s.block_ids[p // block_size] * block_size + p % block_size for p in range(start, end)]
        cu_seqlens.append(cu_seqlens[-1] + n)
        context_lens.append(end)
        if batch.produces_token(i):
            sample_rows.append(cu_seqlens[-1] - 1)
    num_extend = batch.num_extend_requests
    assert all(n == 1 for n in batch.num_scheduled[num_extend:]), "batch is not ordered: use Batch.ordered"

    def tensor(values, dtype):
        return torch.tensor(values, dtype=dtype, device=device)

    def block_table(states):  # [num_reqs, max_blocks] int32, padded with 0
        width = max(len(s.block_ids) for s in states)
        return tensor([s.block_ids + [0] * (width - len(s.block_ids)) for s in states], torch.int32)

    extend = decode = None
    if num_extend:
        extend = ExtendMeta(
            num_tokens=cu_seqlens[num_extend],
            cu_seqlens_q=tensor(cu_seqlens[: num_extend + 1], torch.int32),
            context_lens=tensor(context_lens[:num_extend], torch.int32),
            block_tables=block_table(batch.states[:num_extend]),
        )
    if num_extend < len(batch.states):
        decode = DecodeMeta(
            context_lens=tensor(context_lens[num_extend:], torch.int32),
            block_tables=block_table(batch.states[num_extend:]),
            max_context_len=max(context_lens[num_extend:]),
        )
    ctx = ForwardContext(tensor(slots, torch.int64), extend, decode)
    return tensor(input_ids, torch.int64), tensor(positions, torch.int64), ctx, tensor(sample_rows, torch.int64)
