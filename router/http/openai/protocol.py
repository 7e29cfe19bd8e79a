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
  the raw "eos_token" on /v1/completions), and "tool_calls" for a chat choice that called tools.
- `logprobs` are under the model's own distribution (before penalties, temperature and
  top-k/top-p), as OpenAI and vLLM report them; TGI's routes report the processed distribution
  the token was drawn from, as TGI does (so with top_k=1 every TGI logprob is 0).
- Chat `logprobs` list the tokens that make up the text: special tokens (EOS) are left out, as
  OpenAI never shows its end token; completions' list every token, as vLLM's do, and with `echo`
  the prompt's first (what lm-eval's loglikelihood reads). Non-finite logprobs are reported as
  -9999.0. `top_logprobs` / completions' `logprobs` are limited to `--max-top-n-tokens`.
- Tools (`router.http.openai.tools`): a template that uses `tools` gets them (and the messages'
  `tool_calls`, their `arguments` decoded to objects as transformers and vLLM pass them);
  otherwise they go in the first system message, as TGI's `tool_prompt` does, and past calls and
  `tool` results are written as text. The call format is the model family's (Hermes/Qwen
  `<tool_call>`, the default; Llama 3 JSON; Mistral `[TOOL_CALLS]`). `required` and a named
  function constrain the output from the first token; `auto` is free text in which a call is
  constrained once the family's marker appears (never forced JSON, unlike TGI's `no_tool`);
  `strict` is accepted and always enforced. `parallel_tool_calls: false` allows one call (the
  output then ends). `finish_reason` is "tool_calls" when there are calls (unless "length");
  `content` is null when the answer is only calls; output that breaks the format is returned as
  content. A body of the wrong shape is a `validation` 422; what the tools mean (a parameters
  schema llguidance refuses, duplicate names, `tool_choice` naming an unknown function,
  `required`/named without tools) is a `tool_error` 422, as is a constraining `response_format`
  while tools may be called (the two grammars are not combined: set `tool_choice` "none").
- `best_of` != 1 and `suffix` are refused with a 422 rather than silently ignored.
- `ignore_eos` and `min_tokens` are vLLM's extensions; at most --max-client-batch-size prompts per completion request.
"""

from typing import Annotated, Literal

from pydantic import ConfigDict, Field, ValidationInfo, field_validator, model_validator

from router.http import grammar
from router.http.openai import tools as tool_calling
from router.http.protocol import Refusal, RequestBody
from router.http.tgi.protocol import U64, RequestContext

TokenId = Annotated[int, Field(ge=0)]


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
    response_format: ResponseFormat | None = None
    """Constrain the output (on chat, not while tools may be called)."""
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


class MessageFunctionCall(RequestBody):
    name: str
    arguments: str | dict
    """The arguments as JSON text (OpenAI's), or as an object (TGI's)."""


class MessageToolCall(RequestBody):
    """A call the assistant made earlier in the conversation."""

    id: str | None = None
    type: Literal["function"] = "function"
    function: MessageFunctionCall


class ChatMessage(RequestBody):
    """Other keys (`name`, ...) go to the chat template as they are. A final assistant message is
    continued."""

    model_config = ConfigDict(extra="allow")
    role: str
    """e.g. `system`, `user`, `assistant`, `tool`."""
    content: Annotated[str | list[TextPart] | None, Refusal(CONTENT_SHAPES, types=True)] = None
    """Text, or text parts (joined with newlines); image parts are refused."""
    tool_calls: list[MessageToolCall] | None = None
    """An assistant's calls."""
    tool_call_id: str | None = None
    """A `tool` message's: the call it answers."""

    def for_template(self) -> dict:
        """The message as the chat template sees it: its content flattened to text."""
        content = self.content if not isinstance(self.content, list) else "\n".join(p.text for p in self.content)
        message = {**(self.model_extra or {}), "role": self.role, "content": content or ""}
        if self.tool_calls:
            message["tool_calls"] = [c.model_dump() for c in self.tool_calls]
        if self.tool_call_id is not None:
            message["tool_call_id"] = self.tool_call_id
        return message


FUNCTION_NAME = "^[a-zA-Z0-9_-]{1,64}$"


class FunctionDefinition(RequestBody):
    name: Annotated[
        str,
        Field(pattern=FUNCTION_NAME),
        Refusal("`{name}` must be 1 to 64 letters, digits, `_` or `-`. Given: {value}"),
    ]
    description: str | None = None
    parameters: dict | None = None
    """A JSON schema of the arguments, an object (unset: any object)."""
    strict: bool | None = None
    """Always enforced: calls are constrained to `parameters` either way."""

    def spec(self) -> tool_calling.Function:
        parameters = self.parameters if self.parameters is not None else tool_calling.ANY_OBJECT
        return tool_calling.Function(self.name, self.description, parameters, self.strict)


class Tool(RequestBody):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(RequestBody):
    name: str


class NamedToolChoice(RequestBody):
    type: Literal["function"]
    function: NamedFunction


TOOL_CHOICES = '`tool_choice` must be "none", "auto", "required" or {{"type": "function", "function": {{"name": ...}}}}'


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
    tools: list[Tool] | None = None
    """Functions the model may call: given to the chat template, or described in the system prompt."""
    tool_choice: (
        Annotated[Literal["none", "auto", "required"] | NamedToolChoice, Refusal(TOOL_CHOICES, types=True)] | None
    ) = None
    """`auto` (unset, with tools): text or calls; `required`: calls only; a named function: calls of it only;
    `none`: text."""
    parallel_tool_calls: bool | None = None
    """Allow several calls in one answer (unset: true)."""

    def tool_plan(self, fmt: tool_calling.CallFormat) -> "tool_calling.ToolPlan | None":
        """The tools in effect (None with `tool_choice` "none" or without tools); raises a `tool_error`."""
        choice, named = self.tool_choice, None
        if isinstance(choice, NamedToolChoice):
            choice, named = "function", choice.function.name
        constrained = self.response_format is not None and self.response_format.type != "text"
        functions = [t.function.spec() for t in self.tools or []]
        parallel = self.parallel_tool_calls is not False
        return tool_calling.plan(functions, choice, named, parallel, fmt, constrained)

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
