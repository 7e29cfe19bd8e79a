"""GET /openapi.json (and TGI's /api-doc/openapi.json): an OpenAPI 3.1 document of every route.

The body schemas are those of the protocols' pydantic models, the models that validate requests
and build responses. Which routes need the API key and which count against
`--max-concurrent-requests` comes from `router.http.middleware`, so the document follows the code;
`tests/router/test_openapi.py` checks the routes against `build_app`.
"""

import functools
import json

from aiohttp import web
from pydantic import BaseModel, TypeAdapter
from pydantic.json_schema import GenerateJsonSchema, models_json_schema

from router.http.middleware import GENERATION_ROUTES, PROTECTED_ROUTES
from router.http.openai import protocol as openai_req
from router.http.openai import responses as openai_resp
from router.http.protocol import ErrorResponse
from router.http.state import STATE
from router.http.tgi import protocol as tgi_req
from router.http.tgi import responses as tgi_resp
from router.version import VERSION

TGI, OPENAI, SERVICE = "Text Generation Inference", "OpenAI", "Service"
JSON, SSE = "application/json", "text/event-stream"

REQUESTS = [tgi_req.GenerateRequest, tgi_req.CompatGenerateRequest, tgi_req.TokenizeRequest, openai_req.ChatRequest,
            openai_req.CompletionRequest]  # fmt: skip
RESPONSES = [
    ErrorResponse, tgi_resp.GenerateResponse, tgi_resp.CompatGenerateResponse, tgi_resp.GenerateStreamEvent,
    tgi_resp.TokenizeResponse, tgi_resp.Info, openai_resp.ChatCompletion, openai_resp.ChatCompletionStreamEvent,
    openai_resp.Completion, openai_resp.CompletionStreamEvent, openai_resp.ModelList,
]  # fmt: skip

_HEADERS = {
    "x-compute-type": (str, "Always `sluice`."),
    "x-compute-time": (float, "Total request time (s)."),
    "x-compute-characters": (int, "Characters in `inputs`."),
    "x-total-time": (int, "Total request time (ms)."),
    "x-validation-time": (int, "Validation and tokenization time (ms)."),
    "x-queue-time": (int, "Time waiting to be scheduled (ms)."),
    "x-inference-time": (int, "Time from being scheduled to the end (ms)."),
    "x-time-per-token": (int, "Inference time per generated token (ms)."),
    "x-prompt-tokens": (int, "Prompt tokens (over all prompts on /v1/completions)."),
    "x-generated-tokens": (int, "Generated tokens (over all choices on the OpenAI routes)."),
    "X-Accel-Buffering": (str, "`no`: proxies must not buffer the stream."),
    "Cache-Control": (str, "`no-cache`."),
}
TGI_TIMING = [h for h in _HEADERS if h.startswith("x-")]
OPENAI_TIMING = ["x-compute-type", "x-compute-time", "x-total-time", "x-prompt-tokens", "x-generated-tokens"]
TGI_STREAM = ["x-compute-type", "x-compute-characters", "X-Accel-Buffering", "Cache-Control"]
OPENAI_STREAM = ["x-compute-type", "X-Accel-Buffering", "Cache-Control"]

# status -> (component name, description, error_type, example message)
_ERRORS = {
    "400": ("BadRequest", "The body is not JSON.", "bad_request", "Malformed JSON: Expecting value: line 1 column 1"),
    "401": (
        "Unauthorized",
        "Only when the server runs with `--api-key`: `Authorization: Bearer <key>` is missing or wrong.",
        "authentication",
        "Unauthorized",
    ),
    "413": (
        "PayloadTooLarge",
        "The body is over `--payload-limit` bytes.",
        "payload_too_large",
        "Request Entity Too Large",
    ),
    "415": (
        "UnsupportedMediaType",
        "The body's `Content-Type` is not `application/json` (or a `+json` type).",
        "unsupported_media_type",
        "Expected request with `Content-Type: application/json`",
    ),
    "422": (
        "Unprocessable",
        "The request is invalid (`validation`, with TGI's messages), or the chat template or tools failed "
        "(`template_error`, `tool_error`), or an OpenAI field is refused (`empty_array`, `suffix not supported`, "
        "`batch size exceeded`).",
        "validation",
        "Input validation error: `top_p` must be > 0.0 and < 1.0",
    ),
    "424": (
        "GenerationFailed",
        "The shards failed while generating.",
        "generation",
        "Request failed during generation: Server error: ...",
    ),
    "429": (
        "Overloaded",
        "`--max-concurrent-requests` requests are in flight (a stream holds its slot to its last event), or "
        "the choices of an OpenAI request do not fit beside the running ones.",
        "overloaded",
        "Model is overloaded",
    ),
    "503": (
        "Unhealthy",
        "A shard failed its health check, or the shards are being restarted.",
        "healthcheck",
        "unhealthy",
    ),
    "default": ("Error", "Any other error (404, 405, 500), in the same shape.", "internal", "Internal server error"),
}

_SECURITY = [{"bearerAuth": []}, {}]  # the key is needed only when one is configured


class _Schema(GenerateJsonSchema):
    def field_title_should_be_set(self, schema) -> bool:
        return False  # the field's name says it


def component_schemas() -> dict:
    """The JSON Schema of every request (as validated) and response (as serialized) body, by model name."""
    models = [(m, "validation") for m in REQUESTS] + [(m, "serialization") for m in RESPONSES]
    _, schemas = models_json_schema(models, ref_template="#/components/schemas/{model}", schema_generator=_Schema)
    return schemas["$defs"]


def ref(model: type[BaseModel]) -> dict:
    return {"$ref": f"#/components/schemas/{model.__name__}"}


def _schema(python_type: type) -> dict:
    return TypeAdapter(python_type).json_schema()


def _error_response(description: str, error_type: str, message: str) -> dict:
    example = {"error": message, "error_type": error_type}
    return {"description": description, "content": {JSON: {"schema": ref(ErrorResponse), "example": example}}}


def _errors(*statuses: str) -> dict:
    return {s: {"$ref": f"#/components/responses/{_ERRORS[s][0]}"} for s in (*statuses, "default")}


def _headers(names: list[str]) -> dict:
    return {name: {"$ref": f"#/components/headers/{name}"} for name in names}


def _media(schema: dict, description: str | None = None) -> dict:
    return {"schema": {**schema, "description": description} if description else schema}


def _ok(description: str, content: dict | None = None, headers: list[str] = ()) -> dict:
    response: dict = {"description": description}
    if content:
        response["content"] = content
    if headers:
        response["headers"] = _headers(headers)
    return response


def _operation(op_id: str, tag: str, summary: str, responses: dict, description: str | None) -> dict:
    op = {"tags": [tag], "operationId": op_id, "summary": summary, "responses": responses}
    return {**op, "description": description} if description else op


def _post(
    path: str,
    op_id: str,
    tag: str,
    summary: str,
    body: type[BaseModel],
    ok: dict,
    examples: dict,
    *,
    can_fail: bool = True,
    description: str | None = None,
) -> dict:
    """`{path: {"post": ...}}` with the errors of a JSON body (400, 413, 415, 422), of the API key (401) and
    concurrency (429) middlewares where they apply, and 424 if generation can fail before the response starts."""
    statuses = ["400", "413", "415", "422"]
    if path in PROTECTED_ROUTES:
        statuses.append("401")
    if path in GENERATION_ROUTES:
        statuses.append("429")
    if can_fail:
        statuses.append("424")
    op = _operation(op_id, tag, summary, {"200": ok, **_errors(*sorted(statuses))}, description)
    op["requestBody"] = {"required": True, "content": {JSON: {"schema": ref(body), "examples": examples}}}
    if path in PROTECTED_ROUTES:
        op["security"] = _SECURITY
    return {path: {"post": op}}


def _get(path: str, op_id: str, tag: str, summary: str, ok: dict, *statuses: str) -> dict:
    return {path: {"get": _operation(op_id, tag, summary, {"200": ok, **_errors(*statuses)}, None)}}


def _example(summary: str, value: dict) -> dict:
    return {"summary": summary, "value": value}


TGI_SSE = (
    "Server-sent events `data:<json>` (no space after the colon), one per generated token, with no `[DONE]`: "
    "the connection closes after the last event."
)
OPENAI_SSE = (
    "Server-sent events `data: <json>`: per choice an opening chunk, then one chunk per token (choices "
    "interleave), a usage chunk with `stream_options.include_usage`, then `data: [DONE]`."
)


def _tgi_paths() -> dict:
    prompt = {"inputs": "The capital of France is", "parameters": {"max_new_tokens": 20}}
    sampled = {
        "inputs": "Once upon a time",
        "parameters": {"do_sample": True, "top_p": 0.9, "seed": 42, "details": True},
    }
    examples = {"greedy": _example("Greedy (the README's)", prompt), "sampled": _example("Sampled, details", sampled)}
    generated = {JSON: _media(ref(tgi_resp.GenerateResponse))}
    events = _media(ref(tgi_resp.GenerateStreamEvent), TGI_SSE)
    compat = {
        JSON: _media(ref(tgi_resp.CompatGenerateResponse)),
        SSE: events,
    }
    tokens = {JSON: _media(ref(tgi_resp.TokenizeResponse))}
    info = {JSON: _media(ref(tgi_resp.Info))}
    metrics = {"text/plain": _media(_schema(str))}
    return {
        **_post("/generate", "generate", TGI, "Generate text", tgi_req.GenerateRequest,
                _ok("The generated text.", generated, TGI_TIMING), examples),
        **_post("/generate_stream", "generate_stream", TGI, "Generate text, streamed token by token",
                tgi_req.GenerateRequest, _ok("One event per token.", {SSE: events}, TGI_STREAM), examples,
                can_fail=False, description="Errors after the stream started arrive as an `ErrorResponse` event."),
        **_post("/", "compat_generate", TGI, "Generate text (api-inference format)", tgi_req.CompatGenerateRequest,
                _ok("A JSON array of one response; with `stream: true`, the events (and headers) of "
                    "/generate_stream.", compat, TGI_TIMING),
                {"stream": _example("Streamed", {**prompt, "stream": True}), **examples}),
        **_post("/tokenize", "tokenize", TGI, "Tokenize a prompt", tgi_req.TokenizeRequest,
                _ok("The tokens, with byte offsets into `inputs`.", tokens),
                {"text": _example("Text", {"inputs": "Hello world"})}, can_fail=False),
        **_get("/health", "health", SERVICE, "Shard health (readiness)",
               _ok("Healthy: an empty body. 503 while the shards are being restarted."), "503"),
        **_get("/live", "live", SERVICE, "Liveness",
               _ok("Alive: as /health, but also while the launcher restarts the shards."), "503"),
        **_get("/info", "get_model_info", SERVICE, "Model and limits", _ok("The model.", info)),
        **_get("/metrics", "metrics", SERVICE, "Prometheus metrics",
               _ok("TGI's `tgi_*` metrics (its counters as gauges) and Sluice's `sluice_*`.", metrics)),
    }  # fmt: skip


def _openai_paths(model_id: str) -> dict:
    messages = [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "What is deep learning?"},
    ]
    streamed = {"messages": messages, "stream": True, "stream_options": {"include_usage": True}, "temperature": 0}
    weather = {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The current weather in a city.",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
        },
    }
    tools = {"messages": [{"role": "user", "content": "What is the weather in Paris?"}], "tools": [weather]}
    chat_examples = {
        "chat": _example("Chat", {"model": model_id, "messages": messages, "max_tokens": 20}),
        "stream": _example("Streamed, with usage", streamed),
        "tools": _example("Tools: the model answers in text or calls `get_weather`", tools),
        "required": _example("A call forced", {**tools, "tool_choice": "required", "parallel_tool_calls": False}),
    }
    text = {"model": model_id, "prompt": "What is Deep Learning?", "max_tokens": 20, "seed": 42}
    completion_examples = {
        "text": _example("One prompt", text),
        "ids": _example("Two prompts as token ids, two choices each", {"prompt": [[1, 2, 3], [4, 5]], "n": 2}),
    }
    chat = {
        JSON: _media(ref(openai_resp.ChatCompletion)),
        SSE: _media(ref(openai_resp.ChatCompletionStreamEvent), OPENAI_SSE),
    }
    completion = {
        JSON: _media(ref(openai_resp.Completion)),
        SSE: _media(ref(openai_resp.CompletionStreamEvent), OPENAI_SSE),
    }
    answer = "The completion; with `stream: true`, its chunks."
    model_list = {JSON: _media(ref(openai_resp.ModelList))}
    return {
        **_post("/v1/chat/completions", "chat_completions", OPENAI, "OpenAI chat completions", openai_req.ChatRequest,
                _ok(answer, chat, OPENAI_TIMING), chat_examples),
        **_post("/v1/completions", "completions", OPENAI, "OpenAI (legacy) completions", openai_req.CompletionRequest,
                _ok(answer, completion, OPENAI_TIMING), completion_examples),
        **_get("/v1/models", "models", OPENAI, "The served model", _ok("One model.", model_list)),
    }  # fmt: skip


def _doc_paths() -> dict:
    ok = _ok("This document.", {JSON: _media(_schema(dict), "An OpenAPI 3.1 document.")})
    return {
        **_get("/openapi.json", "openapi", SERVICE, "This OpenAPI document", ok),
        **_get("/api-doc/openapi.json", "openapi_tgi", SERVICE, "This OpenAPI document, at TGI's path", ok),
    }


def openapi_document(model_id: str, version: str) -> dict:
    """The OpenAPI 3.1 document of every route `router.http.app.build_app` serves."""
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "Sluice",
            "version": version,
            "description": f"Text generation serving `{model_id}`, with Hugging Face TGI's and OpenAI's HTTP APIs. "
            "CORS preflight requests (OPTIONS) are answered on every path.",
        },
        "tags": [{"name": TGI}, {"name": OPENAI}, {"name": SERVICE}],
        "paths": {**_tgi_paths(), **_openai_paths(model_id), **_doc_paths()},
        "components": {
            "schemas": component_schemas(),
            "responses": {name: _error_response(*rest) for name, *rest in _ERRORS.values()},
            "headers": {
                name: {"description": description, "schema": _schema(python_type)}
                for name, (python_type, description) in _HEADERS.items()
            },
            "securitySchemes": {
                "bearerAuth": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "The `--api-key` given to the launcher; needed only when one is configured.",
                }
            },
        },
    }


@functools.lru_cache(maxsize=4)
def _document_bytes(model_id: str, version: str) -> bytes:
    return json.dumps(openapi_document(model_id, version)).encode()


async def openapi_json(request: web.Request) -> web.Response:
    state = request.app.get(STATE)
    body = _document_bytes(state.model_id if state is not None else "", VERSION)
    return web.Response(body=body, content_type=JSON)


def add_openapi_routes(app: web.Application) -> None:
    """GET /openapi.json, and TGI's path for it."""
    app.router.add_get("/openapi.json", openapi_json)
    app.router.add_get("/api-doc/openapi.json", openapi_json)
