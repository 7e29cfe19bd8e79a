"""A generation request as the scheduler sees it. Pure data: no I/O, no asyncio."""

from dataclasses import dataclass, field
from enum import IntEnum


class RequestStatus(IntEnum):
    """Ordered so that `status >= FINISHED_LENGTH` means finished."""

    WAITING = 0
    RUNNING = 1
    FINISHED_LENGTH = 2
    FINISHED_EOS = 3
    FINISHED_STOP_SEQUENCE = 4
    FINISHED_ABORTED = 5
    FINISHED_ERROR = 6

    @property
    def is_finished(self) -> bool:
        return self >= RequestStatus.FINISHED_LENGTH


# TGI's names for the finish reasons clients see.
FINISH_REASONS = {
    RequestStatus.FINISHED_LENGTH: "length",
    RequestStatus.FINISHED_EOS: "eos_token",
    RequestStatus.FINISHED_STOP_SEQUENCE: "stop_sequence",
}


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """What the shard needs to pick tokens; mirrors the proto's SamplingParams."""

    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    typical_p: float = 1.0
    repetition_penalty: float = 1.0
    frequency_penalty: float = 0.0
    seed: int = 0
    watermark: bool = False
    top_n_tokens: int = 0
    raw_logprobs: bool = False  # logprobs under the model's distribution (OpenAI) or the processed one (TGI)
    presence_penalty: float = 0.0  # subtracted once from every token generated so far (OpenAI's)
    min_p: float = 0.0  # drop tokens less likely than min_p times the most likely one
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias) added to the logits


@dataclass(frozen=True, slots=True)
class GenerationRequest:
    """One sequence to generate, as the engine takes it from any of the HTTP APIs."""

    input_ids: list[int]
    sampling: SamplingParams
    max_new_tokens: int
    stop: list[str] = field(default_factory=list)  # stop strings, matched on the decoded text
    ignore_eos: bool = False
    min_new_tokens: int = 0  # EOS is ignored until this many tokens were generated
    prompt_logprobs: bool = False  # the logprob of every prompt token (TGI's decoder_input_details)
    report_seed: bool = False  # the seed was given or drawn for sampling: events carry it
    prompt_top_n: int = 0  # with prompt_logprobs: also the most likely tokens at each prompt position
    grammar: str = ""  # an llguidance grammar the output must follow (validated); "": unconstrained
    stop_token_ids: frozenset[int] = frozenset()  # vLLM's: these end the request (after min_new_tokens), kept


@dataclass(slots=True)
class Request:
    req_id: int
    prompt_ids: list[int]
    max_new_tokens: int
    sampling: SamplingParams
    eos_token_ids: frozenset[int] = frozenset()
    ignore_eos: bool = False
    min_new_tokens: int = 0  # EOS is ignored until this many tokens were generated
    needs_prompt_logprobs: bool = False  # computed in full (no prefix-cache hit) so every position has logits
    prompt_top_n: int = 0
    grammar: str = ""
    stop_token_ids: frozenset[int] = frozenset()
    # An encoder-decoder model's encoder input (the user's prompt); prompt_ids then hold the decoder's
    # start token. Empty for a decoder-only model.
    encoder_ids: list[int] = field(default_factory=list)
    arrival_s: float = 0.0
    status: RequestStatus = RequestStatus.WAITING
    output_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0  # tokens whose KV is in the cache or being computed; reset by preemption
    num_pending_outputs: int = 0  # tokens sampled by steps still in flight, known only to the shards
    is_on_shard: bool = False  # the shards hold this request's state (set on first schedule)
    num_preemptions: int = 0

    @property
    def token_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)
