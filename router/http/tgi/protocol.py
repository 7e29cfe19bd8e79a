"""TGI's request bodies as pydantic models, with TGI's rules and messages (the responses are in
responses.py).

A refused request raises `ValidationError`, which becomes 422 with
`{"error": "Input validation error: ...", "error_type": "validation"}`. The rules that depend on
the server's flags read a `RequestContext`; those on token counts run after tokenization, in
`validate`.
"""

import random
from dataclasses import dataclass
from typing import Annotated, Literal

from pydantic import Field, PrivateAttr, ValidationInfo, model_validator

from router.core.request import GenerationRequest, SamplingParams
from router.http import grammar
from router.http.errors import ValidationError
from router.http.protocol import Refusal, RequestBody, parse
from router.limits import ValidationLimits
from router.tokenizer import Tokenizer

U64 = 1 << 64


@dataclass(frozen=True, slots=True)
class RequestContext:
    """What validation needs beyond the body: the server's limits, and whether the route streams."""

    limits: ValidationLimits
    stream: bool


def _positive(name: str) -> Refusal:
    return Refusal(f"`{name}` must be strictly positive")


def _open_unit(name: str) -> Refusal:
    return Refusal(f"`{name}` must be > 0.0 and < 1.0")


BEST_OF_RANGE = "`best_of` must be > 0 and <= {context.limits.max_best_of}. Given: {value}"
TRUNCATE_RANGE = "`truncate` must be strictly positive and less than {context.limits.max_input_tokens}. Given: {value}"
TOP_N_RANGE = "`top_n_tokens` must be >= 0 and <= {context.limits.max_top_n_tokens}. Given: {value}"


class Grammar(RequestBody):
    """TGI's `grammar`: the output must be JSON valid under a schema (`json`, also `json_object`;
    `json_schema` takes `{"name", "schema"}`), or full-match a regex (`regex`)."""

    type: Literal["json", "json_object", "json_schema", "regex"]
    value: Annotated[dict | bool | str, Refusal("`value` must be a JSON schema, its JSON text, or a regex", types=True)]
    """The JSON schema (an object, or its JSON text), `{"name", "schema"}`, or the regex."""
    _llguidance: str = PrivateAttr("")

    @model_validator(mode="after")
    def _compiles(self) -> "Grammar":
        if self.type == "regex":
            if not isinstance(self.value, str):
                raise ValueError("a regex `grammar` takes the regex as a string `value`")
            self._llguidance = grammar.regex(self.value)
        elif self.type == "json_schema":
            if not isinstance(self.value, dict) or "schema" not in self.value:
                raise ValueError('a `json_schema` grammar takes `{"name": ..., "schema": ...}` as `value`')
            self._llguidance = grammar.json_schema(self.value["schema"])
        else:
            self._llguidance = grammar.json_schema(self.value)
        return self

    @property
    def llguidance(self) -> str:
        """The grammar the shards run."""
        return self._llguidance


class GenerateParameters(RequestBody):
    """TGI's `parameters`; null values mean unset."""

    best_of: Annotated[int, Field(ge=1), Refusal(BEST_OF_RANGE)] | None = None
    """Sample this many sequences and return the one with the highest mean token logprob (the others in
    `details.best_of_sequences`). At most `max_best_of`. Above 1: needs sampling, no `seed`, and is refused
    on streams."""
    temperature: Annotated[float, Field(gt=0), _positive("temperature")] | None = None
    """Sampling temperature (unset: 1)."""
    repetition_penalty: Annotated[float, Field(gt=0), _positive("repetition_penalty")] | None = None
    """CTRL-style repetition penalty (unset: 1, off)."""
    frequency_penalty: (
        Annotated[float, Field(ge=-2, le=2), Refusal("`frequency_penalty` must be >= -2.0 and <= 2.0")] | None
    ) = None
    """Subtracted from a token's logit once per previous occurrence (unset: 0)."""
    top_k: Annotated[int, Field(gt=0), _positive("top_k")] | None = None
    """Keep the k most likely tokens (unset: off)."""
    top_p: Annotated[float, Field(gt=0, lt=1), _open_unit("top_p")] | None = None
    """Nucleus sampling (unset: off)."""
    typical_p: Annotated[float, Field(gt=0, lt=1), _open_unit("typical_p")] | None = None
    """Typical sampling (unset: off)."""
    do_sample: bool = False
    """Sample instead of greedy. True when `parameters` is absent or null; setting temperature, top_k, top_p
    or typical_p also samples."""
    max_new_tokens: Annotated[int, Field(gt=0), _positive("max_new_tokens")] | None = None
    """Most tokens to generate; prompt tokens + this must be <= `max_total_tokens` (unset: as many as fit)."""
    return_full_text: bool = False
    """Put the prompt before `generated_text`."""
    stop: list[str] | None = None
    """Stop sequences, matched on text, kept in the output; empty ones are dropped, then at most
    `max_stop_sequences`."""
    truncate: Annotated[int, Field(gt=0), Refusal(TRUNCATE_RANGE)] | None = None
    """Keep only the last N prompt tokens; at most `max_input_tokens`."""
    watermark: bool = False
    """Kirchenbauer et al. watermarking."""
    details: bool = False
    """Return `details`."""
    decoder_input_details: bool = False
    """Return `details` with the prompt's logprobs in `prefill` (refused on streams)."""
    seed: Annotated[int, Field(ge=0, lt=U64), Refusal("`seed` must be an unsigned 64-bit integer")] | None = None
    """Sampling seed (unset: drawn at random, and echoed in details)."""
    top_n_tokens: Annotated[int, Field(ge=0), Refusal(TOP_N_RANGE)] | None = None
    """Also return the n most likely tokens of each step; at most `max_top_n_tokens`."""
    grammar: Grammar | None = None
    """Constrain the output to a JSON schema or a regex."""
    adapter_id: str | None = None
    """No LoRA adapters are served: 422 unless null."""

    @property
    def is_sampling(self) -> bool:
        return self.do_sample or any(v is not None for v in (self.temperature, self.top_k, self.top_p, self.typical_p))

    @model_validator(mode="after")
    def _within_the_server_limits(self, info: ValidationInfo) -> "GenerateParameters":
        context: RequestContext = info.context
        limits = context.limits
        if self.adapter_id:
            raise ValueError(f"adapter `{self.adapter_id}` is not loaded: this server serves no LoRA adapters")
        best_of = self.best_of or 1
        if best_of != 1:
            if limits.max_best_of == 1:
                raise ValueError("`best_of` != 1 is not allowed for this endpoint")
            if best_of > limits.max_best_of:
                raise ValueError(BEST_OF_RANGE.format(context=context, value=best_of))
            if not self.is_sampling:
                raise ValueError("you must use sampling when `best_of` is > 1")
            if self.seed is not None:
                raise ValueError("`seed` must not be set when `best_of` > 1")
            if context.stream:
                raise ValueError("`best_of` != 1 is not supported when streaming tokens")
        if context.stream and self.decoder_input_details:
            raise ValueError("`decoder_input_details` == true is not supported when streaming tokens")
        self.stop = [s for s in self.stop or [] if s]  # an empty string would match at once
        if len(self.stop) > limits.max_stop_sequences:
            raise ValueError(
                f"`stop` supports up to {limits.max_stop_sequences} stop sequences. Given: {len(self.stop)}"
            )
        if (self.top_n_tokens or 0) > limits.max_top_n_tokens:
            raise ValueError(TOP_N_RANGE.format(context=context, value=self.top_n_tokens))
        if self.truncate is not None and self.truncate > limits.max_input_tokens:
            raise ValueError(TRUNCATE_RANGE.format(context=context, value=self.truncate))
        return self


class GenerateRequest(RequestBody):
    """A request to /generate and /generate_stream."""

    inputs: Annotated[str, Field(min_length=1), Refusal("`inputs` cannot be empty")]
    """The prompt."""
    parameters: GenerateParameters | None = None
    """Absent or null: the defaults, sampling."""

    @model_validator(mode="before")
    @classmethod
    def _sample_without_parameters(cls, body: object) -> object:
        """TGI: without a `parameters` object do_sample defaults to true; with one, to false."""
        if isinstance(body, dict) and body.get("parameters") is None:
            return {**body, "parameters": {"do_sample": True}}
        return body


class CompatGenerateRequest(GenerateRequest):
    """A request to / (the api-inference format)."""

    stream: bool = False
    """Stream as /generate_stream does."""


class TokenizeRequest(RequestBody):
    """A request to /tokenize; other fields are ignored."""

    inputs: Annotated[str, Field(min_length=1), Refusal("`inputs` must be a non-empty string")]
    """The text."""


@dataclass(frozen=True, slots=True)
class ValidRequest:
    """A validated, tokenized request."""

    inputs: str
    input_ids: list[int]
    sampling: SamplingParams
    max_new_tokens: int
    stop: list[str]
    details: bool
    decoder_input_details: bool
    return_full_text: bool
    best_of: int
    is_seeded: bool  # the client gave a seed or sampling drew one: echo it in details
    grammar: str = ""  # the llguidance grammar the output follows; "": unconstrained
    ignore_eos: bool = False  # vLLM extensions, set by the OpenAI routes
    min_new_tokens: int = 0
    stop_token_ids: frozenset[int] = frozenset()
    prompt_top_n: int = 0  # with decoder_input_details: the most likely tokens at each prompt position

    def generation(self) -> GenerationRequest:
        """What the engine runs for this request."""
        return GenerationRequest(
            self.input_ids,
            self.sampling,
            self.max_new_tokens,
            self.stop,
            self.ignore_eos,
            self.min_new_tokens,
            self.decoder_input_details,
            self.is_seeded,
            self.prompt_top_n,
            self.grammar,
            self.stop_token_ids,
        )


# No token of a real vocabulary spans more characters than this: a longer text has more tokens than any limit allows.
MAX_CHARS_PER_TOKEN = 64


def check_input_length(inputs: str, limits: ValidationLimits) -> None:
    """Bound the tokenizer's work before running it: refuse a text too long to fit in any case."""
    if len(inputs) > MAX_CHARS_PER_TOKEN * limits.max_total_tokens:
        raise ValidationError(f"`inputs` must have less than {limits.max_input_tokens} tokens. Given: more than that")


def _truncation_window(inputs: str, truncate: int | None) -> str:
    """The text whose tokens end like `inputs`' own for the last `truncate` of them: those span at
    most MAX_CHARS_PER_TOKEN characters each, and tokens never depend on text two windows before
    them, so a 1.9 MB body kept to its last 10 tokens is not tokenized in full."""
    window = 2 * MAX_CHARS_PER_TOKEN * ((truncate or 0) + 1)
    return inputs if truncate is None or len(inputs) <= window else inputs[-window:]


def validate(
    body: object,
    tokenizer: Tokenizer,
    limits: ValidationLimits,
    *,
    stream: bool,
    input_ids: list[int] | None = None,
    add_special_tokens: bool = True,
) -> ValidRequest:
    """Validate a `GenerateRequest` body, tokenize its `inputs` and check the token counts.

    `input_ids` replaces tokenization for prompts given as token ids (then `inputs` is their
    text, used only for `return_full_text` and headers); `add_special_tokens=False` is for
    prompts already rendered by a chat template.
    """
    request = parse(GenerateRequest, body, RequestContext(limits, stream))
    inputs, p = request.inputs, request.parameters
    if p.truncate is None:
        check_input_length(inputs, limits)
    if input_ids is None:
        input_ids = tokenizer.encode(_truncation_window(inputs, p.truncate), add_special_tokens=add_special_tokens)
    elif input_ids and not (0 <= min(input_ids) and max(input_ids) < tokenizer.vocab_size):
        raise ValidationError(f"token ids must be in [0, {tokenizer.vocab_size})")
    if p.truncate is not None:
        input_ids = input_ids[-p.truncate :]
    n = len(input_ids)
    if n == 0:  # e.g. control characters the tokenizer drops: the shards cannot run an empty prompt
        raise ValidationError("`inputs` must have at least one token. Given: 0")
    max_new_tokens = p.max_new_tokens or max(limits.max_total_tokens - n, 1)
    if n + max_new_tokens > limits.max_total_tokens:
        raise ValidationError(
            f"`inputs` tokens + `max_new_tokens` must be <= {limits.max_total_tokens}. "
            f"Given: {n} `inputs` tokens and {max_new_tokens} `max_new_tokens`"
        )
    if n > limits.max_input_tokens:
        raise ValidationError(f"`inputs` must have less than {limits.max_input_tokens} tokens. Given: {n}")

    seed = p.seed
    if seed is None and p.is_sampling:
        seed = random.getrandbits(64)
    sampling = SamplingParams(
        do_sample=p.is_sampling,
        temperature=p.temperature or 1.0,
        top_k=p.top_k or 0,
        top_p=p.top_p or 1.0,
        typical_p=p.typical_p or 1.0,
        repetition_penalty=p.repetition_penalty or 1.0,
        frequency_penalty=p.frequency_penalty or 0.0,
        seed=seed or 0,
        watermark=p.watermark,
        top_n_tokens=p.top_n_tokens or 0,
    )
    return ValidRequest(
        inputs=inputs,
        input_ids=input_ids,
        sampling=sampling,
        max_new_tokens=max_new_tokens,
        stop=p.stop,
        details=p.details,
        decoder_input_details=p.decoder_input_details,
        return_full_text=p.return_full_text,
        best_of=p.best_of or 1,
        is_seeded=p.is_sampling,
        grammar=p.grammar.llguidance if p.grammar is not None else "",
    )
