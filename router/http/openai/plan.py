"""An OpenAI request, validated, as the engine runs it: one TGI-validated request per prompt, its
choices, and how its results are presented (a Plan). The deliberate choices are listed in
`router.http.openai.protocol`."""

import functools
import hashlib
from dataclasses import dataclass, replace

from router.http.errors import OpenAIError, ValidationError
from router.http.openai import tools as tool_calling
from router.http.openai.chat_template import render_chat, template_uses
from router.http.openai.protocol import ChatRequest, CompletionRequest, Sampling
from router.http.protocol import parse
from router.http.tgi.protocol import RequestContext, ValidRequest, validate
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
    tool_format: tool_calling.CallFormat | None = None  # the calls' format, where tools may be called

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


def _plan(
    request: Sampling,
    prompts: list[ValidRequest],
    vocab_size: int,
    logprobs: bool,
    echo: bool,
    tool_format: tool_calling.CallFormat | None = None,
) -> Plan:
    prompts = [_with_extensions(p, request, vocab_size) for p in prompts]
    return Plan(
        request.model, prompts, request.n or 1, bool(request.stream), request.include_usage, logprobs, echo,
        request.stop_sequences, tool_format,
    )  # fmt: skip


def parse_chat(body: object, tokenizer: Tokenizer, limits: ValidationLimits) -> Plan:
    """A /v1/chat/completions body -> a Plan (renders the chat template and tokenizes)."""
    request = parse(ChatRequest, body, RequestContext(limits, stream=False))
    template = tokenizer.chat_template
    fmt = tool_calling.call_format(template, tokenizer.config)
    tool_plan = request.tool_plan(fmt)  # raises a tool_error
    template_has_tools = template_uses(template, "tools")
    messages = tool_calling.messages_for_template(
        [m.for_template() for m in request.messages], tool_plan, fmt, template_has_tools
    )
    offered = [f.openai() for f in tool_plan.offered] if tool_plan and template_has_tools else None
    response_format = request.response_format.tgi_grammar() if request.response_format else None
    max_tokens = request.max_completion_tokens or request.max_tokens
    params = request.tgi_parameters(max_tokens, request.top_logprobs or 0, response_format)
    prompt = render_chat(template, tokenizer.config, messages, offered)  # raises ChatTemplateError
    body = {"inputs": prompt, "parameters": params}
    valid = validate(body, tokenizer, limits, stream=bool(request.stream), add_special_tokens=False)
    if tool_plan is not None:
        encode = functools.partial(tokenizer.encode, add_special_tokens=False)
        specials = tool_calling.special_tokens(fmt, encode, tokenizer.special_ids)
        valid = replace(valid, grammar=tool_calling.tool_grammar(tool_plan, specials))
    tool_format = fmt if tool_plan is not None else None
    return _plan(request, [valid], tokenizer.vocab_size, bool(request.logprobs), echo=False, tool_format=tool_format)


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
    response_format = request.response_format.tgi_grammar() if request.response_format else None
    params = request.tgi_parameters(request.max_tokens or 16, request.logprobs or 0, response_format)
    stream = bool(request.stream)
    valids = [
        validate({"inputs": text, "parameters": params}, tokenizer, limits, stream=stream, input_ids=ids)
        for text, ids in prompts
    ]
    if request.echo and request.logprobs is not None:  # the prompt's logprobs too
        if limits.encoder_decoder:
            raise OpenAIError(
                "echo with logprobs is not available for this encoder-decoder model: its prompt is the "
                "encoder's input, whose tokens get no log-probabilities",
                "echo logprobs not supported",
            )
        valids = [replace(v, decoder_input_details=True, prompt_top_n=request.logprobs) for v in valids]
    return _plan(request, valids, tokenizer.vocab_size, request.logprobs is not None, bool(request.echo))
