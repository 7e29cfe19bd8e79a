"""JSON Schemas (2020-12, as OpenAPI 3.1 uses them) of every request and response body.

Faithful to what the code accepts and returns: bounds are those of `router.http.tgi.protocol` and
`router.http.openai.protocol`; bounds that depend on the server's flags (`max_best_of`,
`max_stop_sequences`, `max_top_n_tokens`, `max_input_tokens`, `max_total_tokens`,
`max_client_batch_size`) are named in descriptions, most readable from `GET /info`. Unknown
fields are ignored by the router, so no object forbids additional properties. `null` means
"unset" for every optional request field.
"""

U64_MAX = 2**64 - 1
_ANNOTATIONS = ("description", "default", "examples")


def ref(name: str) -> dict:
    return {"$ref": f"#/components/schemas/{name}"}


def nullable(schema: dict) -> dict:
    """`schema` or null."""
    if isinstance(schema.get("type"), str) and "const" not in schema:
        out = {**schema, "type": [schema["type"], "null"]}
        if "enum" in out:
            out["enum"] = [*out["enum"], None]
        return out
    inner = {k: v for k, v in schema.items() if k not in _ANNOTATIONS}
    return {"anyOf": [inner, {"type": "null"}], **{k: v for k, v in schema.items() if k in _ANNOTATIONS}}


def obj(properties: dict, required: tuple[str, ...] = (), description: str | None = None, **extra) -> dict:
    schema: dict = {"type": "object", "properties": properties, **extra}
    if required:
        schema["required"] = list(required)
    if description:
        schema["description"] = description
    return schema


def record(fields: dict, description: str | None = None, optional: tuple[str, ...] = ()) -> dict:
    """A response object: every field is always present except those in `optional`."""
    return obj(fields, tuple(f for f in fields if f not in optional), description)


def const(value: str | int) -> dict:
    return {"type": "string" if isinstance(value, str) else "integer", "const": value}


def array(items: dict, description: str | None = None, **extra) -> dict:
    schema = {"type": "array", "items": items, **extra}
    return {**schema, "description": description} if description else schema


def opt(type_: str, description: str, **extra) -> dict:
    """An optional request field: `type_` or null."""
    return nullable({"type": type_, "description": description, **extra})


def _int(description: str, **extra) -> dict:
    return {"type": "integer", "minimum": 0, "description": description, **extra}


def _str(description: str, **extra) -> dict:
    return {"type": "string", "description": description, **extra}


STR, NUM, BOOL = {"type": "string"}, {"type": "number"}, {"type": "boolean"}
SEED = {"minimum": 0, "maximum": U64_MAX}
FINISH_REASON = {"type": "string", "enum": ["length", "eos_token", "stop_sequence"]}
OPENAI_FINISH_REASON = {"type": "string", "enum": ["stop", "length"], "description": "EOS and stop sequences: `stop`"}


# ---------------------------------------------------------------------------------------------
# TGI


def _generate_parameters() -> dict:
    return obj(
        {
            "best_of": opt(
                "integer",
                "Sample this many sequences and return the one with the highest mean token logprob (the others "
                "in `details.best_of_sequences`). At most `max_best_of`; null means 1. Above 1: needs "
                "sampling, no `seed`, and is refused on streams.",
                minimum=1,
                default=1,
            ),
            "temperature": opt("number", "Sampling temperature.", exclusiveMinimum=0, default=1.0),
            "repetition_penalty": opt("number", "CTRL-style repetition penalty.", exclusiveMinimum=0, default=1.0),
            "frequency_penalty": opt("number", "Subtracted per previous occurrence.", minimum=-2, maximum=2, default=0),
            "top_k": opt("integer", "Keep the k most likely tokens (unset: off).", minimum=1),
            "top_p": opt("number", "Nucleus sampling (unset: off).", exclusiveMinimum=0, exclusiveMaximum=1),
            "typical_p": opt("number", "Typical sampling (unset: off).", exclusiveMinimum=0, exclusiveMaximum=1),
            "do_sample": opt(
                "boolean",
                "Sample instead of greedy. Defaults to false, but to true when `parameters` is absent or null; "
                "setting temperature, top_k, top_p or typical_p also samples.",
                default=False,
            ),
            "max_new_tokens": opt(
                "integer",
                "Most tokens to generate; prompt tokens + this must be <= `max_total_tokens` "
                "(unset: `max_total_tokens` - prompt tokens).",
                minimum=1,
            ),
            "return_full_text": opt("boolean", "Prepend the prompt to `generated_text`.", default=False),
            "stop": nullable(
                array(STR, "Stop sequences, matched on text, kept in the output; at most `max_stop_sequences`.")
            ),
            "truncate": opt("integer", "Keep only the last N prompt tokens; at most `max_input_tokens`.", minimum=1),
            "watermark": opt("boolean", "Kirchenbauer et al. watermarking.", default=False),
            "details": opt("boolean", "Return `details`.", default=False),
            "decoder_input_details": opt(
                "boolean",
                "Return `details` with the prompt's logprobs in `prefill` (refused on streams).",
                default=False,
            ),
            "seed": opt("integer", "Sampling seed (unset: drawn at random, echoed in details).", **SEED),
            "top_n_tokens": opt(
                "integer", "Also return the n most likely tokens per step; at most `max_top_n_tokens`.", minimum=0
            ),
            "grammar": {"type": "null", "description": "Constrained generation is not supported: 422 unless null."},
            "adapter_id": {"type": "null", "description": "No LoRA adapters are served: 422 unless null."},
        },
        description="TGI's `parameters`; null values mean unset.",
    )


def _details_fields() -> dict:
    return {
        "finish_reason": ref("FinishReason"),
        "generated_tokens": _int("Tokens generated."),
        "seed": nullable(_int("The seed used; null when decoding was greedy.", maximum=U64_MAX)),
        "prefill": array(ref("PrefillToken"), "The prompt's tokens with `decoder_input_details`, else empty."),
        "tokens": array(ref("Token")),
        "top_tokens": array(array(ref("Token")), "Per generated token, its `top_n_tokens` most likely ones."),
    }


def tgi_schemas() -> dict:
    generate_request = {
        "inputs": _str("The prompt.", minLength=1),
        "parameters": nullable({**ref("GenerateParameters"), "description": "Absent or null: defaults, sampling."}),
    }
    stream = {"type": "boolean", "default": False, "description": "Stream as /generate_stream does."}
    return {
        "GenerateRequest": obj(generate_request, ("inputs",)),
        "CompatGenerateRequest": obj({**generate_request, "stream": stream}, ("inputs",)),
        "GenerateParameters": _generate_parameters(),
        "TokenizeRequest": obj({"inputs": _str("The text.", minLength=1)}, ("inputs",), "Other fields are ignored."),
        "TokenizeResponse": array(
            record(
                {
                    "id": _int("Token id."),
                    "text": _str("The token's span of `inputs`."),
                    "start": _int("Byte offset of the span's start in `inputs` (UTF-8)."),
                    "stop": _int("Byte offset of the span's end."),
                }
            )
        ),
        "FinishReason": FINISH_REASON,
        "Token": record(
            {
                "id": _int("Token id."),
                "text": _str("The token's text (special tokens as their literal)."),
                "logprob": nullable({"type": "number", "description": "Log probability; null if not finite."}),
                "special": BOOL,
            }
        ),
        "PrefillToken": record(
            {"id": _int("Token id."), "text": STR, "logprob": nullable({**NUM, "description": "null for the first."})}
        ),
        "GenerateResponse": record(
            {"generated_text": _str("With `return_full_text`, after the prompt."), "details": ref("Details")},
            "`details` only with `details` or `decoder_input_details`.",
            optional=("details",),
        ),
        "Details": record(
            {**_details_fields(), "best_of_sequences": array(ref("BestOfSequence"), "Only with `best_of` > 1.")},
            "`top_tokens` only with `top_n_tokens` > 0.",
            optional=("top_tokens", "best_of_sequences"),
        ),
        "BestOfSequence": record({"generated_text": STR, **_details_fields()}, optional=("top_tokens",)),
        "StreamResponse": record(
            {
                "index": _int("1 for the first token, then one more per event.", minimum=1),
                "token": ref("Token"),
                "top_tokens": array(ref("Token"), "Only with `top_n_tokens` > 0."),
                "generated_text": nullable(_str("The whole text, on the last event only.")),
                "details": nullable({**ref("StreamDetails"), "description": "On the last event, with `details`."}),
            },
            "One `data:` event per generated token.",
            optional=("top_tokens",),
        ),
        "StreamDetails": record(
            {
                "finish_reason": ref("FinishReason"),
                "generated_tokens": _int("Tokens generated."),
                "seed": nullable(_int("The seed used; null when decoding was greedy.", maximum=U64_MAX)),
                "input_length": _int("Prompt tokens."),
            }
        ),
        "GenerateStreamEvent": {
            "oneOf": [ref("StreamResponse"), ref("ErrorResponse")],
            "description": "The JSON of one event; a failure after the stream started is an ErrorResponse event "
            "(`error_type` `generation`), after which the stream ends.",
        },
        "ErrorResponse": record(
            {
                "error": _str("The message; validation errors start with `Input validation error: `."),
                "error_type": _str(
                    "`bad_request` (400, also 404/405), `authentication` (401), `payload_too_large` (413), "
                    "`validation`, `template_error`, `tool_error`, `empty_array`, `suffix not supported`, "
                    "`batch size exceeded` (422), `generation` (424), `overloaded` (429), `internal` (500), "
                    "`healthcheck` (503)."
                ),
            }
        ),
        "Info": _info(),
    }


def _info() -> dict:
    flag = "The server's `--{}`."
    limits = ("max_concurrent_requests", "max_best_of", "max_stop_sequences", "max_input_tokens", "max_total_tokens")
    fields = {
        "model_id": _str("The served model's name."),
        "model_sha": {"type": "null"},
        "model_dtype": _str("e.g. `bfloat16`."),
        "model_device_type": _str("e.g. `cuda` or `cpu`."),
        "model_pipeline_tag": const("text-generation"),
        **{name: _int(flag.format(name.replace("_", "-"))) for name in limits},
        "validation_workers": const(1),
        "max_client_batch_size": _int("Most prompts in one /v1/completions request."),
        "router": const("sluice-router"),
        "version": _str("The router's version."),
        "sha": {"type": "null"},
        "docker_label": {"type": "null"},
    }
    return record(fields, "TGI's `Info`; the `null` fields are never known here.")


# ---------------------------------------------------------------------------------------------
# OpenAI


def _sampling_fields() -> dict:
    """Fields /v1/chat/completions and /v1/completions share; they become TGI `parameters`."""
    return {
        "model": opt("string", "Echoed back as `model` (unset: the served model); it selects nothing."),
        "temperature": opt("number", "0 means greedy (then `top_p` is ignored).", minimum=0, default=1.0),
        "top_p": opt("number", "Nucleus sampling; >= 1 means off.", exclusiveMinimum=0, default=1.0),
        "frequency_penalty": opt("number", "As TGI's.", minimum=-2, maximum=2, default=0),
        "presence_penalty": nullable({**const(0), "type": "number", "description": "Only 0: use frequency_penalty."}),
        "logit_bias": nullable({"type": "object", "maxProperties": 0, "description": "Only empty."}),
        "best_of": nullable({**const(1), "description": "Only 1."}),
        "n": opt("integer", "Choices per prompt; `n` x prompts <= `max_concurrent_requests`.", minimum=1, default=1),
        "seed": opt("integer", "Sampling seed; choice j > 0 derives its own from it.", **SEED),
        "stop": nullable(
            {
                "anyOf": [STR, array(STR)],
                "description": "Stop sequences, cut from the output; empty ones are dropped, then at most "
                "`max_stop_sequences`.",
            }
        ),
        "stream": opt("boolean", "Stream chunks as SSE, ending with `[DONE]`.", default=False),
        "stream_options": nullable(
            obj({"include_usage": opt("boolean", "Send a last chunk with `usage` and no choices.", default=False)})
        ),
        "ignore_eos": opt("boolean", "vLLM's: keep generating past EOS.", default=False),
        "min_tokens": opt("integer", "vLLM's: ignore EOS before this many tokens; <= the max tokens.", minimum=0),
    }


def _chat_request() -> dict:
    text_part = obj({"type": const("text"), "text": STR}, ("type", "text"))
    content = {
        "anyOf": [STR, {"type": "null"}, array(text_part)],
        "description": "Text, or text parts (joined with newlines); image parts are refused.",
    }
    message = obj(
        {"role": {**STR, "examples": ["system", "user", "assistant", "tool"]}, "content": content},
        ("role",),
        "Other keys (`name`, `tool_calls`, ...) go to the chat template as they are. A final assistant message "
        "is continued.",
    )
    tool = obj({"type": {**STR, "examples": ["function"]}, "function": {"type": "object"}})
    return obj(
        {
            "messages": array(message, "Rendered with the model's chat template.", minItems=1),
            **_sampling_fields(),
            "max_completion_tokens": opt("integer", "Most tokens to generate (over `max_tokens`).", minimum=1),
            "max_tokens": opt("integer", "Most tokens to generate (unset: as many as fit).", minimum=1),
            "logprobs": opt("boolean", "Return the generated tokens' logprobs.", default=False),
            "top_logprobs": opt("integer", "With `logprobs`; at most `max_top_n_tokens`.", minimum=0),
            "response_format": nullable(obj({"type": {**const("text"), "default": "text"}})),
            "tools": nullable(
                array(tool, "Given to the chat template (422 `tool_error` if it takes none); not parsed back.")
            ),
            "tool_choice": {"enum": ["auto", "none", None], "default": "auto", "description": "Only these."},
        },
        ("messages",),
    )


def _completion_request() -> dict:
    ids = {"type": "integer", "minimum": 0, "description": "A token id, below the vocabulary size."}
    prompt = {
        "anyOf": [
            {**STR, "minLength": 1},
            array({**STR, "minLength": 1}, minItems=1),
            array(ids, minItems=1),
            array(array(ids, minItems=1), minItems=1),
        ],
        "description": "One prompt or several (at most `max_client_batch_size`), as text or token ids.",
    }
    return obj(
        {
            "prompt": prompt,
            **_sampling_fields(),
            "max_tokens": opt("integer", "Most tokens to generate per choice.", minimum=1, default=16),
            "logprobs": opt(
                "integer", "Return logprobs, and this many alternatives (<= `max_top_n_tokens`).", minimum=0
            ),
            "echo": opt("boolean", "Prepend the prompt to the text (not with `logprobs`).", default=False),
            "suffix": {"type": "null", "description": "Not supported: 422 unless null."},
        },
        ("prompt",),
    )


def _logprob_entry(**extra) -> dict:
    bytes_ = array({"type": "integer", "minimum": 0, "maximum": 255}, "The token's UTF-8 bytes.")
    return record(
        {"token": STR, "logprob": {**NUM, "description": "-9999.0 when not finite."}, "bytes": bytes_, **extra}
    )


def _envelope(kind: str, choice: str, stream: bool) -> dict:
    fields = {
        "id": _str("`chatcmpl-...` or `cmpl-...`, shared by a stream's chunks."),
        "object": const(kind),
        "created": _int("Unix time (s)."),
        "model": _str("The request's `model`, or the served model."),
        "system_fingerprint": _str("`sluice-<version>`."),
        "choices": array(ref(choice)),
        "usage": nullable(ref("Usage")) if stream else ref("Usage"),
    }
    if not stream:
        return record(fields)
    return record(fields, "With `include_usage`: `usage` null, but on a last chunk with no choices.", ("usage",))


def openai_schemas() -> dict:
    chat_choice = {"index": _int("The choice's index."), "logprobs": nullable(ref("ChatLogprobs"))}
    text_choice = {
        "index": _int("prompt index x `n` + sample index."),
        "text": _str("The text; with `echo`, the prompt first."),
        "logprobs": nullable(ref("CompletionLogprobs")),
    }
    finish = nullable({**OPENAI_FINISH_REASON, "description": "Set on a choice's last chunk."})
    done = {**const("[DONE]"), "description": "The last event's data, as is (not JSON)."}
    return {
        "ChatRequest": _chat_request(),
        "CompletionRequest": _completion_request(),
        "ChatCompletion": _envelope("chat.completion", "ChatCompletionChoice", stream=False),
        "ChatCompletionChoice": record(
            {
                **chat_choice,
                "message": record({"role": const("assistant"), "content": STR}),
                "finish_reason": OPENAI_FINISH_REASON,
            }
        ),
        "ChatCompletionChunk": _envelope("chat.completion.chunk", "ChatCompletionChunkChoice", stream=True),
        "ChatCompletionChunkChoice": record(
            {
                **chat_choice,
                "delta": record(
                    {"role": const("assistant"), "content": STR},
                    "A choice's first chunk has the role and empty content.",
                    optional=("role",),
                ),
                "finish_reason": finish,
            }
        ),
        "ChatLogprobs": record({"content": array(_logprob_entry(top_logprobs=array(_logprob_entry())))}),
        "Completion": _envelope("text_completion", "CompletionChoice", stream=False),
        "CompletionChoice": record({**text_choice, "finish_reason": OPENAI_FINISH_REASON}),
        "CompletionChunk": _envelope("text_completion", "CompletionChunkChoice", stream=True),
        "CompletionChunkChoice": record({**text_choice, "finish_reason": finish}, "With `echo`, the prompt first."),
        "CompletionLogprobs": record(
            {
                "tokens": array(STR),
                "token_logprobs": array(NUM),
                "top_logprobs": array({"type": "object", "additionalProperties": NUM}, "Token text -> logprob."),
                "text_offset": array({"type": "integer", "minimum": 0}),
            },
            "Special tokens are left out.",
        ),
        "Usage": record(
            {
                "prompt_tokens": _int("Each prompt counted once."),
                "completion_tokens": _int("Over every choice."),
                "total_tokens": _int("The sum."),
            }
        ),
        "OpenAIStreamError": record(
            {"error": record({"message": STR, "http_status_code": {"type": "integer", "enum": [424, 500]}})},
            "A failure after the stream started; `[DONE]` follows.",
        ),
        "ChatCompletionStreamEvent": {"oneOf": [ref("ChatCompletionChunk"), ref("OpenAIStreamError"), done]},
        "CompletionStreamEvent": {"oneOf": [ref("CompletionChunk"), ref("OpenAIStreamError"), done]},
        "ModelList": record(
            {
                "object": const("list"),
                "data": array(
                    record(
                        {
                            "id": _str("The served model."),
                            "object": const("model"),
                            "created": const(0),
                            "owned_by": const("sluice"),
                        }
                    ),
                    minItems=1,
                    maxItems=1,
                ),
            }
        ),
    }


def component_schemas() -> dict:
    return {**tgi_schemas(), **openai_schemas()}
