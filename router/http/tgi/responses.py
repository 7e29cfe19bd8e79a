"""TGI's response bodies as pydantic models: /generate's and /generate_stream's from the engine's
token events, /tokenize's and /info's."""

import math
from typing import Annotated, Literal

from pydantic import Field, RootModel

from router.core.engine import Token as EngineToken
from router.core.engine import TokenEvent
from router.http.protocol import ErrorResponse, ResponseBody

FinishReason = Literal["length", "eos_token", "stop_sequence"]


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None


class PrefillToken(ResponseBody):
    id: int
    text: str
    logprob: float | None
    """null for the first token, and where not finite."""


class Token(ResponseBody):
    id: int
    text: str
    """The token's text (special tokens as their literal)."""
    logprob: float | None
    """Log probability; null where not finite."""
    special: bool

    @classmethod
    def of(cls, t: EngineToken) -> "Token":
        return cls(id=t.id, text=t.text, logprob=_finite(t.logprob), special=t.special)


def _omitted_if_none():
    return Field(default=None, exclude_if=lambda v: v is None)


class _SequenceDetails(ResponseBody):
    finish_reason: FinishReason
    generated_tokens: int
    seed: int | None
    """The seed used; null when decoding was greedy."""
    prefill: list[PrefillToken]
    """The prompt's tokens with `decoder_input_details`, else empty."""
    tokens: list[Token]
    top_tokens: list[list[Token]] | None = _omitted_if_none()
    """Per generated token, its `top_n_tokens` most likely ones (only with `top_n_tokens` > 0)."""


class BestOfSequence(_SequenceDetails):
    generated_text: str


class Details(_SequenceDetails):
    best_of_sequences: list[BestOfSequence] | None = _omitted_if_none()
    """The other sequences, with `best_of` > 1."""


class GenerateResponse(ResponseBody):
    """`details` only with `details` or `decoder_input_details`."""

    generated_text: str
    """With `return_full_text`, after the prompt."""
    details: Details | None = _omitted_if_none()

    @classmethod
    def of(cls, events: list[TokenEvent], prefix: str, details: bool, seed: int | None) -> "GenerateResponse":
        """The response for a finished request's events; `prefix` goes before the text."""
        last = events[-1]
        if not details:
            return cls(generated_text=prefix + last.generated_text)
        prefill, top_tokens = events[0].prefill or [], None  # the prompt's logprobs come with the first token
        if any(e.top_tokens for e in events):
            top_tokens = [[Token.of(t) for t in e.top_tokens] for e in events]
        return cls(
            generated_text=prefix + last.generated_text,
            details=Details(
                finish_reason=last.finish_reason,
                generated_tokens=len(events),
                seed=seed,
                prefill=[PrefillToken(id=t.id, text=t.text, logprob=_finite(t.logprob)) for t in prefill],
                tokens=[Token.of(e.token) for e in events],
                top_tokens=top_tokens,
            ),
        )


class CompatGenerateResponse(RootModel[Annotated[list[GenerateResponse], Field(min_length=1, max_length=1)]]):
    """What / answers without `stream`: one response in an array."""


class StreamDetails(ResponseBody):
    finish_reason: FinishReason
    generated_tokens: int
    seed: int | None
    """The seed used; null when decoding was greedy."""
    input_length: int
    """Prompt tokens."""


class StreamResponse(ResponseBody):
    """One `data:` event per generated token."""

    index: Annotated[int, Field(ge=1)]
    """1 for the first token, then one more per event."""
    token: Token
    top_tokens: list[Token] | None = _omitted_if_none()
    """Only with `top_n_tokens` > 0."""
    generated_text: str | None
    """The whole text, on the last event only."""
    details: StreamDetails | None
    """On the last event, with `details`."""

    @classmethod
    def of(
        cls, index: int, event: TokenEvent, prefix: str, details: bool, seed: int | None, input_length: int
    ) -> "StreamResponse":
        finished = event.finish_reason is not None
        return cls(
            index=index,
            token=Token.of(event.token),
            top_tokens=[Token.of(t) for t in event.top_tokens] if event.top_tokens else None,
            generated_text=None if event.generated_text is None else prefix + event.generated_text,
            details=StreamDetails(
                finish_reason=event.finish_reason, generated_tokens=index, seed=seed, input_length=input_length
            )
            if finished and details
            else None,
        )


class TokenizedToken(ResponseBody):
    id: int
    text: str
    """The token's span of `inputs`."""
    start: int
    """Byte offset of the span's start in `inputs` (UTF-8)."""
    stop: int
    """Byte offset of the span's end."""


class TokenizeResponse(RootModel[list[TokenizedToken]]):
    """The tokens of `inputs`, with byte offsets."""


class Info(ResponseBody):
    """TGI's `Info`; the `null` fields are never known here."""

    model_id: str
    """The served model's name."""
    model_sha: None = None
    model_dtype: str
    """e.g. `bfloat16`."""
    model_device_type: str
    """e.g. `cuda` or `cpu`."""
    quantize: str | None
    """The quantization scheme served (`--quantize`, or the checkpoint's own), null for none."""
    model_weight_bytes: int
    """Bytes of the weights as served (quantized, packed), over all shards."""
    model_pipeline_tag: Literal["text-generation"] = "text-generation"
    max_concurrent_requests: int
    max_best_of: int
    max_stop_sequences: int
    max_input_tokens: int
    max_total_tokens: int
    validation_workers: Literal[1] = 1
    max_client_batch_size: int
    """Most prompts in one /v1/completions request."""
    router: Literal["sluice-router"] = "sluice-router"
    version: str
    """The router's version."""
    sha: None = None
    docker_label: None = None


class GenerateStreamEvent(RootModel[StreamResponse | ErrorResponse]):
    """The JSON of one event; a failure after the stream started is an ErrorResponse event (`error_type`
    `generation`), after which the stream ends."""
