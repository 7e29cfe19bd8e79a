"""TGI's `GenerateRequest` JSON -> a validated request, with TGI's rules and messages.

Every failure raises `ValidationError`, which the server turns into 422 with
`{"error": "Input validation error: ...", "error_type": "validation"}`.
"""

import math
import random
from dataclasses import dataclass

from router.core.request import GenerationRequest, SamplingParams
from router.http.errors import ValidationError
from router.limits import ValidationLimits
from router.tokenizer import Tokenizer


@dataclass(frozen=True, slots=True)
class ValidRequest:
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
    ignore_eos: bool = False  # vLLM extensions, set by the OpenAI routes
    min_new_tokens: int = 0

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
        )


_FIELD_TYPES = {
    "best_of": int,
    "temperature": float,
    "repetition_penalty": float,
    "frequency_penalty": float,
    "top_k": int,
    "top_p": float,
    "typical_p": float,
    "do_sample": bool,
    "max_new_tokens": int,
    "return_full_text": bool,
    "stop": list,
    "truncate": int,
    "watermark": bool,
    "details": bool,
    "decoder_input_details": bool,
    "seed": int,
    "top_n_tokens": int,
    "grammar": object,
    "adapter_id": str,
}


def _typed(params: dict) -> dict:
    """Check JSON types (null means unset); numbers must be finite."""
    out = {}
    for name, value in params.items():
        expected = _FIELD_TYPES.get(name)
        if expected is None or value is None:
            continue  # unknown fields are ignored, as serde does
        ok = {
            int: isinstance(value, int) and not isinstance(value, bool),
            float: isinstance(value, (int, float)) and not isinstance(value, bool),
            bool: isinstance(value, bool),
            list: isinstance(value, list) and all(isinstance(s, str) for s in value),
            str: isinstance(value, str),
            object: True,
        }[expected]
        if not ok:
            raise ValidationError(
                f"`{name}` must be of type {expected.__name__ if expected is not list else 'array of strings'}"
            )
        if expected is float and not math.isfinite(value):
            raise ValidationError(f"`{name}` must be a finite number")
        if expected is int and value < 0 and name != "top_k":  # top_k is signed in TGI: its own message below
            raise ValidationError(f"`{name}` must be non-negative")
        out[name] = float(value) if expected is float else value
    return out


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
    """Validate a TGI `GenerateRequest` body and tokenize its `inputs`.

    `input_ids` replaces tokenization for prompts given as token ids (then `inputs` is their
    text, used only for `return_full_text` and headers); `add_special_tokens=False` is for
    prompts already rendered by a chat template.
    """
    if not isinstance(body, dict):
        raise ValidationError("the request body must be a JSON object")
    inputs = body.get("inputs")
    if not isinstance(inputs, str):
        raise ValidationError("`inputs` must be a string")
    raw = body.get("parameters")
    if raw is not None and not isinstance(raw, dict):
        raise ValidationError("`parameters` must be an object")
    # TGI: without a `parameters` object, do_sample defaults to true; with one, to false.
    p = _typed(raw) if raw is not None else {"do_sample": True}
    if p.get("grammar") is not None:
        raise ValidationError("grammar is not supported")
    if p.get("adapter_id"):
        raise ValidationError(f"adapter `{p['adapter_id']}` is not loaded: this server serves no LoRA adapters")

    best_of = p.get("best_of", 1)
    is_sampling = p.get("do_sample", False) or any(k in p for k in ("temperature", "top_k", "top_p", "typical_p"))
    if best_of != 1:
        if limits.max_best_of == 1:
            raise ValidationError("`best_of` != 1 is not allowed for this endpoint")
        if not 0 < best_of <= limits.max_best_of:
            raise ValidationError(f"`best_of` must be > 0 and <= {limits.max_best_of}. Given: {best_of}")
        if not is_sampling:
            raise ValidationError("you must use sampling when `best_of` is > 1")
        if "seed" in p:
            raise ValidationError("`seed` must not be set when `best_of` > 1")
        if stream:
            raise ValidationError("`best_of` != 1 is not supported when streaming tokens")
    if stream and p.get("decoder_input_details"):
        raise ValidationError("`decoder_input_details` == true is not supported when streaming tokens")

    temperature = p.get("temperature", 1.0)
    if temperature <= 0:
        raise ValidationError("`temperature` must be strictly positive")
    repetition_penalty = p.get("repetition_penalty", 1.0)
    if repetition_penalty <= 0:
        raise ValidationError("`repetition_penalty` must be strictly positive")
    frequency_penalty = p.get("frequency_penalty", 0.0)
    if not -2.0 <= frequency_penalty <= 2.0:
        raise ValidationError("`frequency_penalty` must be >= -2.0 and <= 2.0")
    top_p = p.get("top_p")
    if top_p is not None and not 0.0 < top_p < 1.0:
        raise ValidationError("`top_p` must be > 0.0 and < 1.0")
    typical_p = p.get("typical_p")
    if typical_p is not None and not 0.0 < typical_p < 1.0:
        raise ValidationError("`typical_p` must be > 0.0 and < 1.0")
    top_k = p.get("top_k")
    if top_k is not None and top_k <= 0:
        raise ValidationError("`top_k` must be strictly positive")
    max_new_tokens = p.get("max_new_tokens")
    if max_new_tokens == 0:
        raise ValidationError("`max_new_tokens` must be strictly positive")
    stop = [s for s in p.get("stop", []) if s]  # an empty string would match at once
    if len(stop) > limits.max_stop_sequences:
        raise ValidationError(f"`stop` supports up to {limits.max_stop_sequences} stop sequences. Given: {len(stop)}")
    top_n_tokens = p.get("top_n_tokens", 0)
    if top_n_tokens > limits.max_top_n_tokens:
        raise ValidationError(f"`top_n_tokens` must be >= 0 and <= {limits.max_top_n_tokens}. Given: {top_n_tokens}")
    truncate = p.get("truncate")
    if truncate is not None and not 0 < truncate <= limits.max_input_tokens:
        raise ValidationError(
            f"`truncate` must be strictly positive and less than {limits.max_input_tokens}. Given: {truncate}"
        )
    seed = p.get("seed")
    if seed is not None and seed >= 1 << 64:
        raise ValidationError("`seed` must fit in 64 bits")
    if not inputs:
        raise ValidationError("`inputs` cannot be empty")
    if truncate is None:
        check_input_length(inputs, limits)

    if input_ids is None:
        input_ids = tokenizer.encode(_truncation_window(inputs, truncate), add_special_tokens=add_special_tokens)
    elif any(not 0 <= i < tokenizer.vocab_size for i in input_ids):
        raise ValidationError(f"token ids must be in [0, {tokenizer.vocab_size})")
    if truncate is not None:
        input_ids = input_ids[-truncate:]
    n = len(input_ids)
    if n == 0:  # e.g. control characters the tokenizer drops: the shards cannot run an empty prompt
        raise ValidationError("`inputs` must have at least one token. Given: 0")
    if max_new_tokens is None:
        max_new_tokens = max(limits.max_total_tokens - n, 1)
    if n + max_new_tokens > limits.max_total_tokens:
        raise ValidationError(
            f"`inputs` tokens + `max_new_tokens` must be <= {limits.max_total_tokens}. "
            f"Given: {n} `inputs` tokens and {max_new_tokens} `max_new_tokens`"
        )
    if n > limits.max_input_tokens:
        raise ValidationError(f"`inputs` must have less than {limits.max_input_tokens} tokens. Given: {n}")

    if seed is None and is_sampling:
        seed = random.getrandbits(64)
    sampling = SamplingParams(
        do_sample=is_sampling,
        temperature=temperature,
        top_k=top_k or 0,
        top_p=top_p or 1.0,
        typical_p=typical_p or 1.0,
        repetition_penalty=repetition_penalty,
        frequency_penalty=frequency_penalty,
        seed=seed or 0,
        watermark=p.get("watermark", False),
        top_n_tokens=top_n_tokens,
    )
    return ValidRequest(
        inputs=inputs,
        input_ids=input_ids,
        sampling=sampling,
        max_new_tokens=max_new_tokens,
        stop=stop,
        details=p.get("details", False),
        decoder_input_details=p.get("decoder_input_details", False),
        return_full_text=p.get("return_full_text", False),
        best_of=best_of,
        is_seeded=is_sampling,
    )
