"""OpenAI's response bodies as pydantic models (the schemas /openapi.json serves), built from a
Plan and its choices' events; what a choice's text is (stop sequences cut, tool calls taken out)."""

import math
import time
import uuid
from typing import Annotated, Literal

from pydantic import ConfigDict, Field, RootModel

from router.core.engine import Token, TokenEvent
from router.http.openai import tools as tool_calling
from router.http.openai.plan import Plan
from router.http.protocol import ResponseBody
from router.version import VERSION

SYSTEM_FINGERPRINT = f"sluice-{VERSION}"
FinishReason = Literal["stop", "length"]
ChatFinishReason = Literal["stop", "length", "tool_calls"]


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
    stop sequence waits until the next token shows it is not. Special tokens are left out but for
    those in `keep` (tool-call markers), whose literal is part of the text.
    """

    def __init__(self, stop: list[str], keep: tuple[str, ...] = ()):
        self.stop, self.keep = stop, keep
        self.holdback = max((len(s) for s in stop), default=1) - 1
        self.text = ""
        self.plain = 0  # the length of the text without kept special tokens: where generated_text is
        self.sent = 0

    def add(self, event: TokenEvent) -> str:
        token = event.token
        kept = next((k for k in self.keep if token.text.startswith(k)), "") if token.special else ""
        if event.finish_reason is not None:
            if kept or len(self.text) != self.plain:  # the generated text lacks the kept special tokens
                self.text = self.text + kept + event.generated_text[self.plain :]
            else:
                self.text = event.generated_text
            self.text = cut_at_stop(self.text, self.stop)
            end = len(self.text)
        else:
            text = "" if token.special else token.text
            self.text += kept + text
            self.plain += len(text)
            end = max(len(self.text) - self.holdback, 0)  # (a negative end would slice from the end)
        delta = self.text[self.sent : end]
        self.sent = max(self.sent, end)
        return delta


def choice_text(plan: Plan, events: list[TokenEvent]) -> str:
    """A choice's whole text, as `ChoiceText` streams it."""
    text = ChoiceText(plan.stop, plan.tool_format.tokens if plan.tool_format else ())
    for event in events:
        text.add(event)
    return text.text


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

    def add(self, token: Token, top_tokens: list[Token] | None, offset: int, in_text: bool) -> int:
        """Append `token` (whose text starts at `offset`) and return the offset after it: after its
        text if that is `in_text` (a generated special token's is not; an echoed prompt's is)."""
        logprob = None if math.isnan(token.logprob) else _logprob(token.logprob)
        self.tokens.append(token.text)
        self.token_logprobs.append(logprob)
        top = None if top_tokens is None else {t.text: _logprob(t.logprob) for t in top_tokens}
        self.top_logprobs.append(None if logprob is None or top is None else {**top, token.text: logprob})
        self.text_offset.append(offset)
        return offset + (len(token.text) if in_text else 0)

    @classmethod
    def of(cls, events: list[TokenEvent], offset: int) -> "CompletionLogprobs":
        """The generated tokens' logprobs; `offset` is where the first one's text starts in the returned text."""
        out = cls(tokens=[], token_logprobs=[], top_logprobs=[], text_offset=[])
        for e in events:
            offset = out.add(e.token, e.top_tokens, offset, not e.token.special)
        return out

    @classmethod
    def of_prompt(cls, first: TokenEvent) -> "CompletionLogprobs":
        """The prompt tokens' logprobs, from a choice's first event."""
        out, offset = cls(tokens=[], token_logprobs=[], top_logprobs=[], text_offset=[]), 0
        for token, top in zip(first.prefill or [], first.prefill_top_tokens or [None] * len(first.prefill or [])):
            offset = out.add(token, top, offset, True)
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


class FunctionCall(ResponseBody):
    name: str
    arguments: str
    """The arguments: a JSON object, as text."""


class ToolCall(ResponseBody):
    id: str
    """`call_` and 24 random hex digits."""
    type: Literal["function"] = "function"
    function: FunctionCall


def _absent_if_none(value: object) -> bool:
    return value is None


class AssistantMessage(ResponseBody):
    role: Literal["assistant"] = "assistant"
    content: str | None
    """The text; null when the answer is only tool calls."""
    tool_calls: list[ToolCall] | None = Field(default=None, exclude_if=_absent_if_none)
    """The calls, in order; absent when there are none."""

    @classmethod
    def of(cls, plan: Plan, text: str) -> "AssistantMessage":
        """The message for a choice's text: its tool calls parsed out where tools may be called."""
        if plan.tool_format is None:
            return cls(content=text)
        content, calls = tool_calling.parse(plan.tool_format, text)
        if not calls:
            return cls(content=content)
        return cls(
            content=content,
            tool_calls=[ToolCall(id=c.id, function=FunctionCall(name=c.name, arguments=c.arguments)) for c in calls],
        )


def chat_finish_reason(tgi_reason: str | None, has_calls: bool) -> ChatFinishReason | None:
    """OpenAI's finish reason; "tool_calls" when the choice called tools (and was not cut short)."""
    reason = finish_reason(tgi_reason)
    return "tool_calls" if has_calls and reason == "stop" else reason


class ChatChoice(ResponseBody):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None
    finish_reason: ChatFinishReason


class ChatCompletion(_Envelope):
    object: Literal["chat.completion"] = "chat.completion"
    choices: list[ChatChoice]
    usage: Usage

    @classmethod
    def of(cls, plan: Plan, env: dict, results: list[list[TokenEvent]]) -> "ChatCompletion":
        """The response for every choice's events."""
        choices = []
        for i, events in enumerate(results):
            message = AssistantMessage.of(plan, choice_text(plan, events))
            choices.append(
                ChatChoice(
                    index=i,
                    message=message,
                    logprobs=ChatLogprobs.of(events) if plan.logprobs else None,
                    finish_reason=chat_finish_reason(events[-1].finish_reason, bool(message.tool_calls)),
                )
            )
        return cls(**env, choices=choices, usage=Usage.of(plan, sum(map(len, results))))


class FunctionCallDelta(ResponseBody):
    name: str | None = Field(default=None, exclude_if=_absent_if_none)
    """On a call's first delta."""
    arguments: str
    """The next fragment of the arguments' JSON text ("" on a call's first delta)."""


class ToolCallDelta(ResponseBody):
    """A call's first delta has its `id`, `type` and `function.name`; the next ones, fragments of
    `function.arguments`."""

    index: int
    """The call's index in the choice's `tool_calls`."""
    id: str | None = Field(default=None, exclude_if=_absent_if_none)
    type: Literal["function"] | None = Field(default=None, exclude_if=_absent_if_none)
    function: FunctionCallDelta

    @classmethod
    def of(cls, piece: "tool_calling.CallStart | tool_calling.ArgumentsDelta") -> "ToolCallDelta":
        if isinstance(piece, tool_calling.CallStart):
            return cls(index=piece.index, id=piece.id, type="function",
                       function=FunctionCallDelta(name=piece.name, arguments=""))  # fmt: skip
        return cls(index=piece.index, function=FunctionCallDelta(arguments=piece.text))


class ChatDelta(ResponseBody):
    """A choice's first chunk has the role and empty content; then each has content or one tool call's delta."""

    role: Literal["assistant"] | None = Field(default=None, exclude_if=_absent_if_none)
    content: str | None = Field(default=None, exclude_if=_absent_if_none)
    tool_calls: list[ToolCallDelta] | None = Field(default=None, exclude_if=_absent_if_none)


class ChatChunkChoice(ResponseBody):
    index: int
    delta: ChatDelta
    logprobs: ChatLogprobs | None
    finish_reason: ChatFinishReason | None
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
