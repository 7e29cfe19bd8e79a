"""OpenAI's request and response bodies as pydantic models, and the translation of a request into
TGI-validated ones.

Each request is checked by its model, then translated into TGI `parameters` and validated again
as TGI's, so TGI's rules, limits and messages apply (422 "Input validation error: ..."). Choices made where
OpenAI and TGI disagree, or where TGI has a wart:

- `presence_penalty` is OpenAI's (subtracted once from every generated token's logit), not TGI's
  mapping to `repetition_penalty = presence_penalty + 2.0`, which penalizes even at 0.
- `top_p` >= 1 means "no nucleus filtering" (OpenAI's default is 1.0, which TGI refuses).
- `temperature` 0 means greedy (and then `top_p` is ignored); absent means sampling at 1.0,
  OpenAI's default.
- `n` > 1 runs n independent requests at once; choice j of a prompt samples with a seed derived
  from the request's seed (choice 0 uses the seed itself, so n=1 and n=2 agree on choice 0).
  Greedy n > 1 returns identical choices. Completions' choice index is `prompt * n + j`.
  `prompt_tokens` counts each prompt once, `completion_tokens` counts every choice.
- Stop sequences are cut from the returned text, as OpenAI does (TGI keeps them); while
  streaming, text that may begin a stop sequence is held back until it cannot.
- Finish reasons are "stop" (EOS or a stop sequence) or "length", streamed or not (TGI streams
  the raw "eos_token" on /v1/completions).
- `logprobs` are under the model's own distribution (before penalties, temperature and
  top-k/top-p), as OpenAI and vLLM report them; TGI's routes report the processed distribution
  the token was drawn from, as TGI does (so with top_k=1 every TGI logprob is 0).
- Chat `logprobs` list the tokens that make up the text: special tokens (EOS) are left out, as
  OpenAI never shows its end token; completions' list every token, as vLLM's do, and with `echo`
  the prompt's first (what lm-eval's loglikelihood reads). Non-finite logprobs are reported as
  -9999.0. `top_logprobs` / completions' `logprobs` are limited to `--max-top-n-tokens`.
- `tools` are passed to the chat template only when the template uses them (otherwise 422
  `tool_error`); the output is not parsed into `tool_calls`. `tool_choice` may be "auto" or
  "none". `response_format` other than "text", a non-empty `logit_bias`, `best_of` != 1 and
  `suffix` are refused with a 422 rather than silently ignored.
- `ignore_eos` and `min_tokens` are vLLM's extensions; at most --max-client-batch-size prompts per completion request.
"""

import hashlib
import math
import time
import uuid
from dataclasses import dataclass, replace
from typing import Annotated, Literal

from pydantic import ConfigDict, Field, RootModel, ValidationInfo, field_validator, model_validator

from router.core.engine import Token, TokenEvent
from router.http import grammar
from router.http.errors import OpenAIError, ValidationError
from router.http.openai.chat_template import render_chat, template_uses
from router.http.protocol import Refusal, RequestBody, ResponseBody, parse
from router.http.tgi.protocol import U64, RequestContext, ValidRequest, validate
from router.limits import ValidationLimits
from router.tokenizer import Tokenizer
from router.version import VERSION

TokenId = Annotated[int, Field(ge=0)]


class StreamOptions(RequestBody):
    include_usage: bool | None = None
    """Send a last chunk with `usage` and no choices."""


class Sampling(RequestBody):
    """The fields /v1/chat/completions and /v1/completions share; they become TGI `parameters`."""

    model: str | None = None
    """Echoed back as `model` (unset: the served model); it selects nothing."""
    temperature: Annotated[float, Field(ge=0), Refusal("`temperature` must be strictly positive")] | None = None
    """0 means greedy (then `top_p` is ignored); unset means 1."""
    top_p: Annotated[float, Field(gt=0), Refusal("`top_p` must be > 0.0 and < 1.0")] | None = None
    """Nucleus sampling; >= 1 means off."""
    frequency_penalty: (
        Annotated[float, Field(ge=-2, le=2), Refusal("`frequency_penalty` must be >= -2.0 and <= 2.0")] | None
    ) = None
    """As TGI's."""
    presence_penalty: (
        Annotated[float, Field(ge=-2, le=2), Refusal("`presence_penalty` must be >= -2.0 and <= 2.0")] | None
    ) = None
    """Subtracted once from the logit of every token already generated."""
    logit_bias: dict[str, Annotated[float, Field(ge=-100, le=100)]] | None = None
    """Token id (as a string) -> a bias in [-100, 100] added to its logit."""
    min_p: Annotated[float, Field(ge=0, le=1)] | None = None
    """vLLM's: drop tokens less likely than `min_p` times the most likely one."""
    stop_token_ids: list[TokenId] | None = None
    """vLLM's: token ids that end the generation (after `min_tokens`); they are kept in the output."""
    best_of: Annotated[Literal[1], Refusal("`best_of` != 1 is not supported")] | None = None
    """Only 1."""
    n: Annotated[int, Field(ge=1), Refusal("`n` must be >= 1. Given: {value}")] | None = None
    """Choices per prompt; `n` x prompts <= `max_concurrent_requests`."""
    seed: Annotated[int, Field(ge=0, lt=U64), Refusal("`seed` must be an unsigned 64-bit integer")] | None = None
    """Sampling seed; choice j > 0 derives its own from it."""
    stop: str | list[str] | None = None
    """Stop sequences, cut from the output; empty ones are dropped, then at most `max_stop_sequences`."""
    stream: bool | None = None
    """Stream chunks as server-sent events, ending with `[DONE]`."""
    stream_options: StreamOptions | None = None
    ignore_eos: bool | None = None
    """vLLM's: keep generating past EOS."""
    min_tokens: Annotated[int, Field(ge=0)] | None = None
    """vLLM's: ignore EOS before this many tokens; at most the max tokens."""

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)

    @property
    def stop_sequences(self) -> list[str]:
        stop = [self.stop] if isinstance(self.stop, str) else self.stop or []
        return [s for s in stop if s]

    def tgi_parameters(self, max_new_tokens: int | None, top_n_tokens: int, grammar: dict | None = None) -> dict:
        """These fields as TGI `parameters` (those TGI lacks are applied by `with_extensions`)."""
        params = {
            "details": True,
            "max_new_tokens": max_new_tokens,
            "top_n_tokens": top_n_tokens,
            "seed": self.seed,
            "frequency_penalty": self.frequency_penalty,
            "stop": self.stop_sequences,
            "grammar": grammar,
        }
        if self.temperature == 0:
            return {**params, "do_sample": False}
        top_p = None if self.top_p is not None and self.top_p >= 1 else self.top_p
        return {**params, "do_sample": True, "temperature": self.temperature, "top_p": top_p}


class TextPart(RequestBody):
    type: Literal["text"]
    text: str


CONTENT_SHAPES = '`{name}` must be a string, null, or an array of {{"type": "text", "text": "..."}} parts'


class ChatMessage(RequestBody):
    """Other keys (`name`, `tool_calls`, ...) go to the chat template as they are. A final assistant
    message is continued."""

    model_config = ConfigDict(extra="allow")
    role: str
    """e.g. `system`, `user`, `assistant`, `tool`."""
    content: Annotated[str | list[TextPart] | None, Refusal(CONTENT_SHAPES, types=True)] = None
    """Text, or text parts (joined with newlines); image parts are refused."""

    def for_template(self) -> dict:
        """The message as the chat template sees it: its content flattened to text."""
        content = self.content if not isinstance(self.content, list) else "\n".join(p.text for p in self.content)
        return {**(self.model_extra or {}), "role": self.role, "content": content or ""}


class JsonSchemaFormat(RequestBody):
    name: str
    description: str | None = None
    schema_: Annotated[dict | None, Field(alias="schema")] = None
    """The schema the output follows (absent: any JSON object)."""
    strict: bool | None = None
    """Always enforced: the output is constrained to the schema either way."""


class ResponseFormat(RequestBody):
    """`text`; `json_object` (any JSON object); `json_schema` (JSON valid under `json_schema.schema`). TGI's
    `{"type": "json", "value": schema}` and `{"type": "regex", "value": ...}` are accepted too."""

    type: Literal["text", "json_object", "json_schema", "json", "regex"] = "text"
    json_schema: JsonSchemaFormat | None = None
    value: dict | bool | str | None = None

    @model_validator(mode="after")
    def _complete(self) -> "ResponseFormat":
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("`response_format` of type `json_schema` needs `json_schema`")
        if self.type in ("json", "regex") and self.value is None:
            raise ValueError(f"`response_format` of type `{self.type}` needs `value`")
        return self

    def tgi_grammar(self) -> dict | None:
        """This format as TGI's `grammar`."""
        if self.type == "json_schema":
            return {"type": "json", "value": self.json_schema.schema_ or grammar.JSON_OBJECT_SCHEMA}
        if self.type == "json_object":
            return {"type": "json", "value": grammar.JSON_OBJECT_SCHEMA}
        if self.type in ("json", "regex"):
            return {"type": self.type, "value": self.value}
        return None


class Tool(RequestBody):
    type: str
    """`function`."""
    function: dict


_IMAGE_PARTS = ("image_url", "input_image", "image")
TOP_LOGPROBS_RANGE = "`top_logprobs` must be >= 0 and <= {context.limits.max_top_n_tokens}. Given: {value}"


class ChatRequest(Sampling):
    """A request to /v1/chat/completions."""

    messages: Annotated[list[ChatMessage], Field(min_length=1), Refusal("`messages` must be a non-empty array")]
    """Rendered with the model's chat template."""
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    """Most tokens to generate (over `max_tokens`)."""
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    """Most tokens to generate (unset: as many as fit)."""
    logprobs: bool | None = None
    """Return the generated tokens' logprobs."""
    top_logprobs: Annotated[int, Field(ge=0), Refusal(TOP_LOGPROBS_RANGE)] | None = None
    """With `logprobs`; at most `max_top_n_tokens`."""
    response_format: ResponseFormat | None = None
    tools: list[Tool] | None = None
    """Given to the chat template (422 `tool_error` if it takes none); not parsed back."""
    tool_choice: str | dict | None = None
    """Only `auto` or `none`."""

    @field_validator("messages", mode="before")
    @classmethod
    def _no_images(cls, messages: object) -> object:
        for i, message in enumerate(messages if isinstance(messages, list) else []):
            parts = message.get("content") if isinstance(message, dict) else None
            if isinstance(parts, list) and any(isinstance(p, dict) and p.get("type") in _IMAGE_PARTS for p in parts):
                raise ValueError(f"`messages[{i}]`: image content is not supported: this model has no vision input")
        return messages

    @model_validator(mode="after")
    def _logprob_options(self, info: ValidationInfo) -> "ChatRequest":
        context: RequestContext = info.context
        if (self.top_logprobs or 0) > context.limits.max_top_n_tokens:
            raise ValueError(TOP_LOGPROBS_RANGE.format(context=context, value=self.top_logprobs))
        if self.top_logprobs and not self.logprobs:
            raise ValueError("`top_logprobs` needs `logprobs` set to true")
        return self


PROMPT_SHAPES = "`prompt` must be a string, an array of strings, of token ids, or of arrays of token ids"
LOGPROBS_RANGE = "`logprobs` must be >= 0 and <= {context.limits.max_top_n_tokens}. Given: {value}"


class CompletionRequest(Sampling):
    """A request to /v1/completions."""

    prompt: Annotated[str | list[str] | list[TokenId] | list[list[TokenId]], Refusal(PROMPT_SHAPES, types=True)]
    """One prompt or several (at most `max_client_batch_size`), as text or token ids."""
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    """Most tokens to generate per choice (unset: 16)."""
    logprobs: Annotated[int, Field(ge=0), Refusal(LOGPROBS_RANGE)] | None = None
    """Return logprobs, and this many alternatives (at most `max_top_n_tokens`)."""
    echo: bool | None = None
    """Put the prompt before the text (with `logprobs`, the prompt tokens' too)."""
    suffix: str | None = None
    """Not supported: 422 unless null."""

    @model_validator(mode="after")
    def _logprob_options(self, info: ValidationInfo) -> "CompletionRequest":
        context: RequestContext = info.context
        if (self.logprobs or 0) > context.limits.max_top_n_tokens:
            raise ValueError(LOGPROBS_RANGE.format(context=context, value=self.logprobs))
        return self


@dataclass(frozen=True, slots=True)
class Plan:
    """A parsed OpenAI request: one validated request per prompt, and how to present results."""

    model: str | None
    prompts: list[ValidRequest]
    n: int
    stream: bool
    include_usage: bool
    logprobs: bool
    echo: bool
    stop: list[str]

    @property
    def num_choices(self) -> int:
        return len(self.prompts) * self.n

    def choices(self) -> list[ValidRequest]:
        """One request per choice; choice i is sample i % n of prompt i // n."""
        return [_choice(p, j) for p in self.prompts for j in range(self.n)]


def _choice(valid: ValidRequest, j: int) -> ValidRequest:
    """Choice j of a prompt: its own sample seed, and logprobs of the model's own distribution."""
    seed = valid.sampling.seed
    if j and valid.sampling.do_sample:
        seed = int.from_bytes(hashlib.blake2b(f"{seed}:{j}".encode(), digest_size=8).digest(), "little")
    return replace(valid, sampling=replace(valid.sampling, seed=seed, raw_logprobs=True))


def _with_extensions(valid: ValidRequest, request: Sampling, vocab_size: int) -> ValidRequest:
    """Apply what TGI's parameters lack: OpenAI's `presence_penalty` and `logit_bias`, vLLM's `min_p`,
    `stop_token_ids`, `ignore_eos` and `min_tokens`."""
    min_tokens = request.min_tokens or 0
    if min_tokens > valid.max_new_tokens:
        limit = valid.max_new_tokens
        raise ValidationError(f"`min_tokens` must be >= 0 and <= `max_tokens` ({limit}). Given: {min_tokens}")
    logit_bias = []
    for key, bias in (request.logit_bias or {}).items():
        if not key.isdigit() or int(key) >= vocab_size:
            raise ValidationError(f"`logit_bias` keys must be token ids in [0, {vocab_size}). Given: {key!r}")
        logit_bias.append((int(key), bias))
    stop_token_ids = frozenset(request.stop_token_ids or ())
    if any(i >= vocab_size for i in stop_token_ids):
        raise ValidationError(f"`stop_token_ids` must be token ids in [0, {vocab_size})")
    sampling = replace(
        valid.sampling,
        presence_penalty=request.presence_penalty or 0.0,
        min_p=request.min_p or 0.0,
        logit_bias=tuple(logit_bias),
    )
    return replace(
        valid,
        sampling=sampling,
        ignore_eos=bool(request.ignore_eos),
        min_new_tokens=min_tokens,
        stop_token_ids=stop_token_ids,
    )


def _plan(request: Sampling, prompts: list[ValidRequest], vocab_size: int, logprobs: bool, echo: bool) -> Plan:
    prompts = [_with_extensions(p, request, vocab_size) for p in prompts]
    return Plan(
        request.model, prompts, request.n or 1, bool(request.stream), request.include_usage, logprobs, echo,
        request.stop_sequences,
    )  # fmt: skip


def parse_chat(body: object, tokenizer: Tokenizer, limits: ValidationLimits) -> Plan:
    """A /v1/chat/completions body -> a Plan (renders the chat template and tokenizes)."""
    request = parse(ChatRequest, body, RequestContext(limits, stream=False))
    tools = _tools(request, tokenizer.chat_template)
    response_format = request.response_format.tgi_grammar() if request.response_format else None
    max_tokens = request.max_completion_tokens or request.max_tokens
    params = request.tgi_parameters(max_tokens, request.top_logprobs or 0, response_format)
    messages = [m.for_template() for m in request.messages]
    prompt = render_chat(tokenizer.chat_template, tokenizer.config, messages, tools)  # raises ChatTemplateError
    body = {"inputs": prompt, "parameters": params}
    valid = validate(body, tokenizer, limits, stream=bool(request.stream), add_special_tokens=False)
    return _plan(request, [valid], tokenizer.vocab_size, bool(request.logprobs), echo=False)


def _tools(request: ChatRequest, template: str | None) -> list[dict] | None:
    if request.tool_choice not in (None, "auto", "none"):
        raise OpenAIError('Tool error: only `tool_choice` "auto" and "none" are supported', "tool_error")
    if not request.tools or request.tool_choice == "none":
        return None
    if not template_uses(template, "tools"):
        raise OpenAIError("Tool error: this model's chat template does not support tools", "tool_error")
    return [t.model_dump() for t in request.tools]


def _prompts(prompt: object, tokenizer: Tokenizer, limits: ValidationLimits) -> list[tuple[str, list[int] | None]]:
    """A validated `prompt` -> [(text, token ids or None)]."""
    if isinstance(prompt, str):
        return [(prompt, None)]
    if not prompt:
        raise OpenAIError("Empty array detected. Do not use an empty array for the prompt.", "empty_array")
    if isinstance(prompt[0], str):
        return [(p, None) for p in prompt]
    out = []
    for ids in [prompt] if isinstance(prompt[0], int) else prompt:
        if len(ids) > limits.max_input_tokens:  # before decoding them
            raise ValidationError(f"`inputs` must have less than {limits.max_input_tokens} tokens. Given: {len(ids)}")
        if any(i >= tokenizer.vocab_size for i in ids):
            raise ValidationError(f"token ids must be in [0, {tokenizer.vocab_size})")
        out.append((tokenizer.decode(ids, skip_special_tokens=False), ids))
    return out


def parse_completion(body: object, tokenizer: Tokenizer, limits: ValidationLimits) -> Plan:
    """A /v1/completions body -> a Plan with one validated request per prompt."""
    request = parse(CompletionRequest, body, RequestContext(limits, stream=False))
    if request.suffix is not None:
        raise OpenAIError(
            "Suffix is not supported and can be achieved by preprocessing the prompt.", "suffix not supported"
        )
    prompts = _prompts(request.prompt, tokenizer, limits)
    if len(prompts) > limits.max_client_batch_size:
        raise OpenAIError(
            f"Number of prompts exceeds the maximum allowed batch size of {limits.max_client_batch_size}",
            "batch size exceeded",
        )
    params = request.tgi_parameters(request.max_tokens or 16, request.logprobs or 0)
    stream = bool(request.stream)
    valids = [
        validate({"inputs": text, "parameters": params}, tokenizer, limits, stream=stream, input_ids=ids)
        for text, ids in prompts
    ]
    if request.echo and request.logprobs is not None:  # the prompt's logprobs too
        valids = [replace(v, decoder_input_details=True, prompt_top_n=request.logprobs) for v in valids]
    return _plan(request, valids, tokenizer.vocab_size, request.logprobs is not None, bool(request.echo))


# ---------------------------------------------------------------------------------------------
# Responses


SYSTEM_FINGERPRINT = f"sluice-{VERSION}"
FinishReason = Literal["stop", "length"]


def envelope(kind: str, model: str) -> dict:
    """The fields every response and chunk of one request shares."""
    return {
        "id": f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex}",
        "created": int(time.time()),
        "model": model,
        "system_fingerprint": SYSTEM_FINGERPRINT,
    }


def finish_reason(tgi_reason: str | None) -> FinishReason | None:
    """TGI's "eos_token" and "stop_sequence" are both OpenAI's "stop"."""
    return None if tgi_reason is None else "length" if tgi_reason == "length" else "stop"


def cut_at_stop(text: str, stop: list[str]) -> str:
    """`text` up to the first stop sequence in it."""
    ends = [i for i in (text.find(s) for s in stop) if i >= 0]
    return text[: min(ends)] if ends else text


class ChoiceText:
    """One choice's visible text as it streams: stop sequences never appear in it.

    `add()` returns the text that may be sent after an event; text that could be the start of a
    stop sequence waits until the next token shows it is not.
    """

    def __init__(self, stop: list[str]):
        self.stop = stop
        self.holdback = max((len(s) for s in stop), default=1) - 1
        self.text = ""
        self.sent = 0

    def add(self, event: TokenEvent) -> str:
        if event.finish_reason is not None:
            self.text = cut_at_stop(event.generated_text, self.stop)
            end = len(self.text)
        else:
            self.text += "" if event.token.special else event.token.text
            end = len(self.text) - self.holdback
        delta = self.text[self.sent : end]
        self.sent = max(self.sent, end)
        return delta


class Usage(ResponseBody):
    prompt_tokens: int
    """Each prompt counted once."""
    completion_tokens: int
    """Over every choice."""
    total_tokens: int

    @classmethod
    def of(cls, plan: Plan, num_generated: int) -> "Usage":
        prompt_tokens = sum(len(p.input_ids) for p in plan.prompts)
        return cls(
            prompt_tokens=prompt_tokens, completion_tokens=num_generated, total_tokens=prompt_tokens + num_generated
        )


def _logprob(x: float) -> float:
    return x if math.isfinite(x) else -9999.0


class TopLogprob(ResponseBody):
    token: str
    logprob: float
    """-9999.0 when not finite."""
    bytes: list[Annotated[int, Field(ge=0, le=255)]]
    """The token's UTF-8 bytes."""

    @classmethod
    def of(cls, text: str, logprob: float) -> "TopLogprob":
        return cls(token=text, logprob=_logprob(logprob), bytes=list(text.encode()))


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(ResponseBody):
    content: list[TokenLogprob]
    """The generated tokens; special ones (EOS) are left out."""

    @classmethod
    def of(cls, events: list[TokenEvent]) -> "ChatLogprobs":
        return cls(
            content=[
                TokenLogprob(
                    **TopLogprob.of(e.token.text, e.token.logprob).model_dump(),
                    top_logprobs=[TopLogprob.of(t.text, t.logprob) for t in e.top_tokens],
                )
                for e in events
                if not e.token.special
            ]
        )


class CompletionLogprobs(ResponseBody):
    """Every token: with `echo`, the prompt's first (the first of which has no logprob), then the
    generated ones, special tokens included (whose literal is not in the text)."""

    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    """Token text -> logprob, the token's own included."""
    text_offset: list[Annotated[int, Field(ge=0)]]

    def add(self, token: Token, top_tokens: list[Token] | None, offset: int) -> int:
        """Append `token` (whose text starts at `offset`) and return the offset after it."""
        logprob = None if math.isnan(token.logprob) else _logprob(token.logprob)
        self.tokens.append(token.text)
        self.token_logprobs.append(logprob)
        top = None if top_tokens is None else {t.text: _logprob(t.logprob) for t in top_tokens}
        self.top_logprobs.append(None if logprob is None or top is None else {**top, token.text: logprob})
        self.text_offset.append(offset)
        return offset + (0 if token.special else len(token.text))

    @classmethod
    def of(cls, events: list[TokenEvent], offset: int) -> "CompletionLogprobs":
        """The generated tokens' logprobs; `offset` is where the first one's text starts in the returned text."""
        out = cls(tokens=[], token_logprobs=[], top_logprobs=[], text_offset=[])
        for e in events:
            offset = out.add(e.token, e.top_tokens, offset)
        return out

    @classmethod
    def of_prompt(cls, first: TokenEvent) -> "CompletionLogprobs":
        """The prompt tokens' logprobs, from a choice's first event."""
        out, offset = cls(tokens=[], token_logprobs=[], top_logprobs=[], text_offset=[]), 0
        for token, top in zip(first.prefill or [], first.prefill_top_tokens or [None] * len(first.prefill or [])):
            offset = out.add(token, top, offset)
        return out

    def __add__(self, other: "CompletionLogprobs") -> "CompletionLogprobs":
        return CompletionLogprobs(**{k: getattr(self, k) + getattr(other, k) for k in type(self).model_fields})


class _Envelope(ResponseBody):
    id: str
    """`chatcmpl-...` or `cmpl-...`, shared by a stream's chunks."""
    created: int
    """Unix time (s)."""
    model: str
    """The request's `model`, or the served model."""
    system_fingerprint: str
    """`sluice-<version>`."""


class AssistantMessage(ResponseBody):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(ResponseBody):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None
    finish_reason: FinishReason


class ChatCompletion(_Envelope):
    object: Literal["chat.completion"] = "chat.completion"
    choices: list[ChatChoice]
    usage: Usage

    @classmethod
    def of(cls, plan: Plan, env: dict, results: list[list[TokenEvent]]) -> "ChatCompletion":
        """The response for every choice's events."""
        choices = [
            ChatChoice(
                index=i,
                message=AssistantMessage(content=cut_at_stop(events[-1].generated_text, plan.stop)),
                logprobs=ChatLogprobs.of(events) if plan.logprobs else None,
                finish_reason=finish_reason(events[-1].finish_reason),
            )
            for i, events in enumerate(results)
        ]
        return cls(**env, choices=choices, usage=Usage.of(plan, sum(map(len, results))))


class ChatDelta(ResponseBody):
    """A choice's first chunk has the role and empty content."""

    role: Literal["assistant"] | None = Field(default=None, exclude_if=lambda v: v is None)
    content: str


class ChatChunkChoice(ResponseBody):
    index: int
    delta: ChatDelta
    logprobs: ChatLogprobs | None
    finish_reason: FinishReason | None
    """Set on a choice's last chunk."""


def _usage_optional(schema: dict) -> None:
    schema["required"].remove("usage")


class _Chunk(_Envelope):
    model_config = ConfigDict(json_schema_extra=_usage_optional)
    usage: Usage | None = None


class ChatCompletionChunk(_Chunk):
    """A streamed chat completion's chunk; with `include_usage`, `usage` is null but on a last chunk with no
    choices, otherwise absent."""

    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    choices: list[ChatChunkChoice]


def echoed(plan: Plan, choice: int) -> str:
    """The prompt text that `echo` puts before choice `choice`'s text."""
    return plan.prompts[choice // plan.n].inputs if plan.echo else ""


class CompletionChoice(ResponseBody):
    index: int
    """prompt index x `n` + sample index."""
    text: str
    """The text; with `echo`, the prompt first."""
    logprobs: CompletionLogprobs | None
    finish_reason: FinishReason


class Completion(_Envelope):
    object: Literal["text_completion"] = "text_completion"
    choices: list[CompletionChoice]
    usage: Usage

    @classmethod
    def of(cls, plan: Plan, env: dict, results: list[list[TokenEvent]]) -> "Completion":
        """The response for every choice's events."""
        choices = []
        for i, events in enumerate(results):
            prefix = echoed(plan, i)
            logprobs = None
            if plan.logprobs:
                logprobs = CompletionLogprobs.of(events, len(prefix))
                if plan.echo:
                    logprobs = CompletionLogprobs.of_prompt(events[0]) + logprobs
            choices.append(
                CompletionChoice(
                    index=i,
                    text=prefix + cut_at_stop(events[-1].generated_text, plan.stop),
                    logprobs=logprobs,
                    finish_reason=finish_reason(events[-1].finish_reason),
                )
            )
        return cls(**env, choices=choices, usage=Usage.of(plan, sum(map(len, results))))


class CompletionChunkChoice(ResponseBody):
    """With `echo`, the prompt comes first, in a chunk of its own."""

    index: int
    text: str
    logprobs: CompletionLogprobs | None
    finish_reason: FinishReason | None
    """Set on a choice's last chunk."""


class CompletionChunk(_Chunk):
    """A streamed completion's chunk; with `include_usage`, `usage` is null but on a last chunk with no
    choices, otherwise absent."""

    object: Literal["text_completion"] = "text_completion"
    choices: list[CompletionChunkChoice]


class StreamErrorDetail(ResponseBody):
    message: str
    http_status_code: Literal[424, 500]


class StreamError(ResponseBody):
    """A failure after the stream started; `[DONE]` follows."""

    error: StreamErrorDetail


Done = Annotated[Literal["[DONE]"], Field(description="The last event's data, as is (not JSON).")]


class ChatCompletionStreamEvent(RootModel[ChatCompletionChunk | StreamError | Done]):
    """The data of one event of a streamed chat completion."""


class CompletionStreamEvent(RootModel[CompletionChunk | StreamError | Done]):
    """The data of one event of a streamed completion."""


class ModelCard(ResponseBody):
    id: str
    """The served model."""
    object: Literal["model"] = "model"
    created: Literal[0] = 0
    owned_by: Literal["sluice"] = "sluice"


class ModelList(ResponseBody):
    object: Literal["list"] = "list"
    data: Annotated[list[ModelCard], Field(min_length=1, max_length=1)]
