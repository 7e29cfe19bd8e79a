"""OpenAI request bodies -> TGI-validated requests, and generation results -> OpenAI JSON.

Every request is translated into TGI `parameters` and goes through `validate()`, so TGI's
rules, limits and messages apply (422 "Input validation error: ..."). Choices made where
OpenAI and TGI disagree, or where TGI has a wart:

- `presence_penalty`: only 0 is accepted; any other value is refused with a 422. TGI maps it to
  `repetition_penalty = presence_penalty + 2.0`, a different (multiplicative) penalty that even
  penalizes at presence_penalty 0; an honest presence penalty needs the sampler's support.
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
- `logprobs` list the tokens that make up the text: special tokens (EOS) are left out, as
  OpenAI never shows its end token; non-finite logprobs are reported as -9999.0. `top_logprobs`
  / completions' `logprobs` are limited to `--max-top-n-tokens`. Completions' `echo` with
  `logprobs` is refused: it needs prompt logprobs, which are not computed.
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
from importlib import metadata

from router.core.engine import TokenEvent
from router.http.errors import OpenAIError, ValidationError
from router.http.openai.chat_template import normalize_messages, render_chat, template_uses
from router.http.tgi.protocol import ValidRequest, validate
from router.limits import ValidationLimits
from router.tokenizer import Tokenizer


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


_KINDS = {
    int: lambda v: isinstance(v, int) and not isinstance(v, bool),
    float: lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    bool: lambda v: isinstance(v, bool),
    dict: lambda v: isinstance(v, dict),
    list: lambda v: isinstance(v, list),
}


def _get(body: dict, name: str, kind: type, default=None):
    """`body[name]` checked against `kind`; null or absent gives `default`."""
    value = body.get(name)
    if value is None:
        return default
    if not _KINDS[kind](value):
        raise ValidationError(f"`{name}` must be of type {kind.__name__}")
    return value


def _stop(body: dict) -> list | None:
    stop = body.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    return [s for s in stop if s != ""] if isinstance(stop, list) else stop


def _tgi_parameters(body: dict, max_new_tokens: int | None, top_n_tokens: int) -> dict:
    """The sampling fields both routes share, as TGI `parameters`."""
    if _get(body, "presence_penalty", float, 0) != 0:
        raise ValidationError("`presence_penalty` is not supported (only 0): use `frequency_penalty`")
    if _get(body, "best_of", int, 1) != 1:
        raise ValidationError("`best_of` != 1 is not supported")
    if _get(body, "logit_bias", dict):
        raise ValidationError("`logit_bias` is not supported")
    params = {
        "details": True,
        "max_new_tokens": max_new_tokens,
        "top_n_tokens": top_n_tokens,
        "seed": body.get("seed"),
        "frequency_penalty": body.get("frequency_penalty"),
        "stop": _stop(body),
    }
    temperature, top_p = body.get("temperature"), body.get("top_p")
    if _KINDS[float](temperature) and temperature == 0:
        return {**params, "do_sample": False}
    if _KINDS[float](top_p) and top_p >= 1:
        top_p = None
    return {**params, "do_sample": True, "temperature": temperature, "top_p": top_p}


def _limited(valid: ValidRequest, body: dict) -> ValidRequest:
    """Apply `ignore_eos` and `min_tokens`, which TGI does not know."""
    min_tokens = _get(body, "min_tokens", int, 0)
    if not 0 <= min_tokens <= valid.max_new_tokens:
        limit = valid.max_new_tokens
        raise ValidationError(f"`min_tokens` must be >= 0 and <= `max_tokens` ({limit}). Given: {min_tokens}")
    return replace(valid, ignore_eos=_get(body, "ignore_eos", bool, False), min_new_tokens=min_tokens)


def _top_n(value: int | None, name: str, limit: int) -> int:
    if value is not None and not 0 <= value <= limit:
        raise ValidationError(f"`{name}` must be >= 0 and <= {limit}. Given: {value}")
    return value or 0


def _common(body: object) -> tuple[dict, int, bool, bool]:
    """(body, n, stream, include_usage)"""
    if not isinstance(body, dict):
        raise ValidationError("the request body must be a JSON object")
    n = _get(body, "n", int, 1)
    if n < 1:
        raise ValidationError(f"`n` must be >= 1. Given: {n}")
    stream = _get(body, "stream", bool, False)
    options = _get(body, "stream_options", dict, {})
    return body, n, stream, stream and _get(options, "include_usage", bool, False)


def _model(body: dict) -> str | None:
    return body["model"] if isinstance(body.get("model"), str) else None


def parse_chat(body: object, tokenizer: Tokenizer, limits: ValidationLimits) -> Plan:
    """A /v1/chat/completions body -> a Plan (renders the chat template and tokenizes)."""
    body, n, stream, include_usage = _common(body)
    messages = normalize_messages(body.get("messages"))
    format_type = _get(body, "response_format", dict, {}).get("type", "text")
    if format_type != "text":
        raise ValidationError(f"`response_format` {format_type!r} is not supported: constrained generation is not")
    tools = _tools(body, tokenizer.chat_template)
    logprobs = _get(body, "logprobs", bool, False)
    top = _top_n(_get(body, "top_logprobs", int), "top_logprobs", limits.max_top_n_tokens)
    if top and not logprobs:
        raise ValidationError("`top_logprobs` needs `logprobs` set to true")
    max_tokens = _get(body, "max_completion_tokens", int)
    max_tokens = _get(body, "max_tokens", int) if max_tokens is None else max_tokens
    params = _tgi_parameters(body, max_tokens, top)
    prompt = render_chat(tokenizer.chat_template, tokenizer.config, messages, tools)  # raises ChatTemplateError
    valid = validate(
        {"inputs": prompt, "parameters": params}, tokenizer, limits, stream=stream, add_special_tokens=False
    )
    valid = _limited(valid, body)
    return Plan(_model(body), [valid], n, stream, include_usage, logprobs, False, params["stop"] or [])


def _tools(body: dict, template: str | None) -> list | None:
    tools = _get(body, "tools", list)
    choice = body.get("tool_choice")
    if choice not in (None, "auto", "none"):
        raise OpenAIError('Tool error: only `tool_choice` "auto" and "none" are supported', "tool_error")
    if not tools or choice == "none":
        return None
    if not template_uses(template, "tools"):
        raise OpenAIError("Tool error: this model's chat template does not support tools", "tool_error")
    return tools


def _prompts(prompt: object, tokenizer: Tokenizer, limits: ValidationLimits) -> list[tuple[str, list[int] | None]]:
    """`prompt` -> [(text, token ids or None)]: a string, strings, token ids, or lists of token ids."""
    if isinstance(prompt, str):
        return [(prompt, None)]
    if isinstance(prompt, list) and not prompt:
        raise OpenAIError("Empty array detected. Do not use an empty array for the prompt.", "empty_array")
    if isinstance(prompt, list) and all(isinstance(p, str) for p in prompt):
        return [(p, None) for p in prompt]
    if isinstance(prompt, list) and all(_KINDS[int](i) for i in prompt):
        prompt = [prompt]
    if not isinstance(prompt, list) or not all(isinstance(p, list) and all(_KINDS[int](i) for i in p) for p in prompt):
        raise ValidationError("`prompt` must be a string, an array of strings, of token ids, or of arrays of token ids")
    out = []
    for ids in prompt:
        if len(ids) > limits.max_input_tokens:  # before decoding them
            raise ValidationError(f"`inputs` must have less than {limits.max_input_tokens} tokens. Given: {len(ids)}")
        if any(not 0 <= i < tokenizer.vocab_size for i in ids):
            raise ValidationError(f"token ids must be in [0, {tokenizer.vocab_size})")
        out.append((tokenizer.decode(ids, skip_special_tokens=False), ids))
    return out


def parse_completion(body: object, tokenizer: Tokenizer, limits: ValidationLimits) -> Plan:
    """A /v1/completions body -> a Plan with one validated request per prompt."""
    body, n, stream, include_usage = _common(body)
    if body.get("suffix") is not None:
        raise OpenAIError(
            "Suffix is not supported and can be achieved by preprocessing the prompt.", "suffix not supported"
        )
    prompts = _prompts(body.get("prompt"), tokenizer, limits)
    if len(prompts) > limits.max_client_batch_size:
        raise OpenAIError(
            f"Number of prompts exceeds the maximum allowed batch size of {limits.max_client_batch_size}",
            "batch size exceeded",
        )
    logprobs = _get(body, "logprobs", int)
    echo = _get(body, "echo", bool, False)
    if echo and logprobs is not None:
        raise ValidationError("`echo` with `logprobs` is not supported: prompt logprobs are not computed")
    params = _tgi_parameters(
        body, _get(body, "max_tokens", int, 16), _top_n(logprobs, "logprobs", limits.max_top_n_tokens)
    )
    valids = [
        _limited(
            validate({"inputs": text, "parameters": params}, tokenizer, limits, stream=stream, input_ids=ids), body
        )
        for text, ids in prompts
    ]
    return Plan(_model(body), valids, n, stream, include_usage, logprobs is not None, echo, params["stop"] or [])


# ---------------------------------------------------------------------------------------------
# Responses


def _fingerprint() -> str:
    try:
        return f"sluice-{metadata.version('sluice')}"
    except metadata.PackageNotFoundError:
        return "sluice"


SYSTEM_FINGERPRINT = _fingerprint()


def envelope(kind: str, model: str) -> dict:
    """The fields every response and chunk of one request shares."""
    prefix = "chatcmpl" if kind.startswith("chat") else "cmpl"
    return {
        "id": f"{prefix}-{uuid.uuid4().hex}",
        "object": kind,
        "created": int(time.time()),
        "model": model,
        "system_fingerprint": SYSTEM_FINGERPRINT,
    }


def finish_reason(tgi_reason: str | None) -> str | None:
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


def _logprob(x: float) -> float:
    return x if math.isfinite(x) else -9999.0


def _entry(text: str, logprob: float) -> dict:
    return {"token": text, "logprob": _logprob(logprob), "bytes": list(text.encode())}


def chat_logprobs(events: list[TokenEvent]) -> dict:
    """`{"content": [...]}` for the non-special tokens of `events`."""
    return {
        "content": [
            {**_entry(e.token.text, e.token.logprob), "top_logprobs": [_entry(t.text, t.logprob) for t in e.top_tokens]}
            for e in events
            if not e.token.special
        ]
    }


def completion_logprobs(events: list[TokenEvent], offset: int) -> dict:
    """The legacy shape; `offset` is where the first token's text starts in the returned text."""
    out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for e in events:
        if e.token.special:
            continue
        top = {t.text: _logprob(t.logprob) for t in e.top_tokens}
        out["tokens"].append(e.token.text)
        out["token_logprobs"].append(_logprob(e.token.logprob))
        out["top_logprobs"].append({**top, e.token.text: _logprob(e.token.logprob)})
        out["text_offset"].append(offset)
        offset += len(e.token.text)
    return out


def usage(plan: Plan, num_generated: int) -> dict:
    prompt_tokens = sum(len(p.input_ids) for p in plan.prompts)
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": num_generated,
        "total_tokens": prompt_tokens + num_generated,
    }


def chat_response(plan: Plan, env: dict, results: list[list[TokenEvent]]) -> dict:
    """The non-streamed chat.completion for every choice's events."""
    choices = [
        {
            "index": i,
            "message": {"role": "assistant", "content": cut_at_stop(events[-1].generated_text, plan.stop)},
            "logprobs": chat_logprobs(events) if plan.logprobs else None,
            "finish_reason": finish_reason(events[-1].finish_reason),
        }
        for i, events in enumerate(results)
    ]
    return {**env, "choices": choices, "usage": usage(plan, sum(map(len, results)))}


def echoed(plan: Plan, choice: int) -> str:
    """The prompt text that `echo` puts before choice `choice`'s text."""
    return plan.prompts[choice // plan.n].inputs if plan.echo else ""


def completion_response(plan: Plan, env: dict, results: list[list[TokenEvent]]) -> dict:
    """The non-streamed text_completion for every choice's events."""
    choices = []
    for i, events in enumerate(results):
        prefix = echoed(plan, i)
        choices.append(
            {
                "index": i,
                "text": prefix + cut_at_stop(events[-1].generated_text, plan.stop),
                "logprobs": completion_logprobs(events, len(prefix)) if plan.logprobs else None,
                "finish_reason": finish_reason(events[-1].finish_reason),
            }
        )
    return {**env, "choices": choices, "usage": usage(plan, sum(map(len, results)))}


def chunk(plan: Plan, env: dict, choice: dict) -> dict:
    """A streamed chunk carrying one choice (with `usage: null` when usage was asked for)."""
    body = {**env, "choices": [choice]}
    if plan.include_usage:
        body["usage"] = None
    return body


def chat_delta(plan: Plan, index: int, delta: dict, event: TokenEvent | None) -> dict:
    """One chat choice delta; `event` None for the opening role chunk."""
    logprobs = chat_logprobs([event]) if plan.logprobs and event is not None else None
    reason = finish_reason(event.finish_reason) if event is not None else None
    return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": reason}


def completion_delta(plan: Plan, index: int, text: str, event: TokenEvent | None, offset: int) -> dict:
    """One completion choice; `event` None for the echoed prompt."""
    logprobs = completion_logprobs([event], offset) if plan.logprobs and event is not None else None
    reason = finish_reason(event.finish_reason) if event is not None else None
    return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": reason}
