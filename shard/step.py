"""What a step asks of the shard (decoded from protobuf in server.py) and what it answers."""

from dataclasses import dataclass, field

import numpy as np

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
    num_prompt_tokens: int = 0  # leading token_ids that are the prompt (0: all); the rest were generated
    grammar: str = ""  # llguidance TopLevelGrammar JSON every generated token must follow; "": none
    prompt_top_n: int = 0  # with prompt_logprobs: also this many most likely tokens per prompt position
    encoder_token_ids: list[int] = field(default_factory=list)  # encoder-decoder models: the encoder's input
    encoder_block_ids: list[int] = field(default_factory=list)  # where its cross-attention K/V go


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
    grammar_completed: bool = False  # the request's grammar admits nothing after this token


@dataclass(frozen=True, slots=True)
class PromptLogprobs:
    req_id: int
    first_position: int  # logprobs[i] is that of the prompt token at first_position + i
    logprobs: list[float]
    top_tokens: list[list[tuple[int, float]]] = field(default_factory=list)  # per position, most likely first


@dataclass(frozen=True, slots=True)
class StepOutput:
    step_id: int
    outputs: list[TokenOutput]
    forward_ns: int
    sample_ns: int
    prompt_logprobs: list[PromptLogprobs] = field(default_factory=list)


@dataclass(slots=True)
class RequestState:
    """A request described in full, outside the shard's persistent batch (tests, warmup)."""

    req_id: int
    token_ids: list[int]  # prompt, then every sampled token
    num_prompt_tokens: int
    num_computed_tokens: int  # tokens whose KV is in the cache
    block_ids: list[int]
    sampling: SamplingParams = SamplingParams()
    prompt_logprobs: bool = False
    encoder_token_ids: list[int] = field(default_factory=list)  # encoder-decoder models: the encoder's input
    encoder_block_ids: list[int] = field(default_factory=list)  # where its cross-attention K/V are


@dataclass(frozen=True, slots=True)
class Batch:
    """Requests and how many tokens each computes, multi-token requests first."""

    states: list[RequestState]
    num_scheduled: list[int]

    @classmethod
    def single(
        cls,
        token_ids: list[int],
        block_ids: list[int],
        encoder_token_ids: list[int] = (),
        encoder_block_ids: list[int] = (),
    ) -> "Batch":
        """One request computing all of `token_ids` from the start (after encoding
        `encoder_token_ids` into `encoder_block_ids`, for an encoder-decoder model)."""
        state = RequestState(
            -1,
            token_ids,
            len(token_ids),
            0,
            block_ids,
            encoder_token_ids=list(encoder_token_ids),
            encoder_block_ids=list(encoder_block_ids),
        )
        return cls([state], [len(token_ids)])

    def arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(token_ids [N, L], block_table [N, B], num_tokens [N], num_computed [N], rows [N],
        num_scheduled [N]): the batch as the tables input_batch.prepare_inputs reads."""
        n = len(self.states)
        token_ids = np.zeros((n, max(len(s.token_ids) for s in self.states)), dtype=np.int64)
        block_table = np.zeros((n, max(len(s.block_ids) for s in self.states)), dtype=np.int32)
        for i, s in enumerate(self.states):
            token_ids[i, : len(s.token_ids)] = s.token_ids
            block_table[i, : len(s.block_ids)] = s.block_ids
        num_tokens = np.array([len(s.token_ids) for s in self.states], dtype=np.int64)
        num_computed = np.array([s.num_computed_tokens for s in self.states], dtype=np.int64)
        return token_ids, block_table, num_tokens, num_computed, np.arange(n), np.array(self.num_scheduled)

    def encoder_arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """(encoder_lens [N], encoder_block_table [N, B]): what cross-attention reads, by row."""
        n = len(self.states)
        table = np.zeros((n, max(1, max(len(s.encoder_block_ids) for s in self.states))), dtype=np.int32)
        for i, s in enumerate(self.states):
            table[i, : len(s.encoder_block_ids)] = s.encoder_block_ids
        return np.array([len(s.encoder_token_ids) for s in self.states], dtype=np.int32), table
