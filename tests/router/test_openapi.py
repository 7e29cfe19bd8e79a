"""The OpenAPI document: valid OpenAPI 3.1, every served route in it, request schemas that accept
and refuse what the validation code does, and response schemas that what the code returns fits."""

import copy
import json
import types

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from jsonschema import Draft202012Validator
from openapi_spec_validator import OpenAPIV31SpecValidator
from openapi_spec_validator import validate as validate_spec
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

from router.core.engine import Token, TokenEvent
from router.core.shard_client import ModelInfo, ShardError
from router.http.app import build_app
from router.http.errors import ValidationError
from router.http.middleware import GENERATION_ROUTES, PROTECTED_ROUTES
from router.http.openai import protocol as oai
from router.http.openai.chat_template import ChatTemplateError
from router.http.openai.protocol import OpenAIError, parse_chat, parse_completion
from router.http.openai.routes import _ChatChunks, _CompletionChunks, add_openai_routes
from router.http.openapi import add_openapi_routes, openapi_document
from router.http.responses import error_json, generate_json, stream_json
from router.http.state import ServerState
from router.http.tgi.protocol import validate
from router.limits import ValidationLimits
from router.metrics import Metrics

DOC = openapi_document("test-model", "0.1.0")
URI = "urn:sluice:openapi"
REGISTRY = Registry().with_resource(URI, Resource.from_contents(DOC, default_specification=DRAFT202012))
LIMITS = ValidationLimits(
    max_best_of=2, max_stop_sequences=4, max_top_n_tokens=5, max_input_tokens=1000, max_total_tokens=2000
)
EXPECTED_ROUTES = {
    ("POST", "/"),
    ("POST", "/generate"),
    ("POST", "/generate_stream"),
    ("POST", "/tokenize"),
    ("POST", "/v1/chat/completions"),
    ("POST", "/v1/completions"),
    ("GET", "/health"),
    ("GET", "/info"),
    ("GET", "/metrics"),
    ("GET", "/v1/models"),
    ("GET", "/openapi.json"),
    ("GET", "/api-doc/openapi.json"),
}


class ByteTokenizer:
    """One token per UTF-8 byte, and a minimal chat template: enough for validation."""

    vocab_size = 256
    config: dict = {}
    chat_template = "{% for m in messages %}<{{ m.role }}>{{ m.content }}\n{% endfor %}<assistant>"

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(text.encode())

    def encode_with_offsets(self, text: str, add_special_tokens: bool = True) -> tuple[list[int], list]:
        return self.encode(text), [(i, i + 1) for i in range(len(text))]  # ASCII only

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return bytes(ids).decode(errors="replace")


class StandInShards:
    def __init__(self, is_healthy: bool):
        self.is_healthy = is_healthy

    async def health(self) -> None:
        if not self.is_healthy:
            raise ShardError("shard 0 is gone")


def _schema(name: str) -> Draft202012Validator:
    return Draft202012Validator({"$ref": f"{URI}#/components/schemas/{name}"}, registry=REGISTRY)


def _stand_in_state(max_concurrent_requests: int = 8, is_healthy: bool = True) -> ServerState:
    """No engine beyond its health flag: `build_app` reads only the metrics and the concurrency
    limit, handlers the rest."""
    return ServerState(
        engine=types.SimpleNamespace(is_healthy=True),
        shards=StandInShards(is_healthy),
        tokenizer=ByteTokenizer(),
        limits=LIMITS,
        model_info=ModelInfo("LlamaForCausalLM", "float32", "cpu", 256, [2], 16, 2048, 1),
        model_id="test-model",
        max_concurrent_requests=max_concurrent_requests,
        metrics=Metrics(max_input_tokens=16, max_total_tokens=32),
    )


def _documented() -> set[tuple[str, str]]:
    return {(method.upper(), path) for path, item in DOC["paths"].items() for method in item}


def _routes(app: web.Application) -> set[tuple[str, str]]:
    # aiohttp adds HEAD for every GET route on its own
    return {(r.method, r.resource.canonical) for r in app.router.routes() if r.method != "HEAD"}


# ---------------------------------------------------------------------------------------------
# The document


def test_document_is_valid_openapi_3_1():
    validate_spec(DOC, cls=OpenAPIV31SpecValidator)
    assert DOC["openapi"].startswith("3.1")
    assert json.loads(json.dumps(DOC)) == DOC


def test_every_component_schema_is_a_valid_2020_12_schema():
    for schema in DOC["components"]["schemas"].values():
        Draft202012Validator.check_schema(schema)


def test_every_route_of_build_app_is_documented_and_nothing_else():
    routes = _routes(build_app(_stand_in_state(), payload_limit=1000, api_key="secret"))
    assert routes == EXPECTED_ROUTES
    assert _documented() == routes


def test_every_openai_route_is_documented():
    app = web.Application()
    add_openai_routes(app)
    assert _routes(app) <= _documented()


@pytest.mark.parametrize("path", sorted(PROTECTED_ROUTES))
def test_protected_routes_declare_the_bearer_key_and_401(path):
    op = DOC["paths"][path]["post"]
    assert {"bearerAuth": []} in op["security"]
    assert "401" in op["responses"]


def test_only_protected_routes_declare_security():
    for path, item in DOC["paths"].items():
        for op in item.values():
            assert ("security" in op) == (path in PROTECTED_ROUTES), path


def test_generation_routes_declare_429_and_others_do_not():
    for path, item in DOC["paths"].items():
        for op in item.values():
            assert ("429" in op["responses"]) == (path in GENERATION_ROUTES), path


def test_streaming_routes_offer_server_sent_events():
    for path in ("/", "/generate_stream", "/v1/chat/completions", "/v1/completions"):
        assert "text/event-stream" in DOC["paths"][path]["post"]["responses"]["200"]["content"], path


# ---------------------------------------------------------------------------------------------
# Request schemas against the code that validates requests

TOKENIZER = ByteTokenizer()
PARSERS = {
    "GenerateRequest": lambda body: validate(body, TOKENIZER, LIMITS, stream=False),
    "CompatGenerateRequest": lambda body: validate(body, TOKENIZER, LIMITS, stream=False),
    "ChatRequest": lambda body: parse_chat(body, TOKENIZER, LIMITS),
    "CompletionRequest": lambda body: parse_completion(body, TOKENIZER, LIMITS),
}


def _code_accepts(schema: str, body: object) -> bool:
    try:
        PARSERS[schema](copy.deepcopy(body))
    except (ValidationError, OpenAIError, ChatTemplateError):
        return False
    return True


def _params(**parameters) -> dict:
    return {"inputs": "Hello", "parameters": parameters}


CHAT = [{"role": "system", "content": "You are a helpful assistant."}, {"role": "user", "content": "Hello!"}]

# (schema, body, accepted). Left out: refusals that depend on the server's limits (number of stop
# sequences, top_n_tokens, truncate) or on several fields at once (best_of without sampling,
# top_logprobs without logprobs), which a schema does not express.
CASES = [
    # TGI's README and docs
    ("GenerateRequest", {"inputs": "The capital of France is", "parameters": {"max_new_tokens": 20}}, True),
    (
        "GenerateRequest",
        {"inputs": "What is Deep Learning?", "parameters": {"max_new_tokens": 20, "details": True}},
        True,
    ),
    ("GenerateRequest", {"inputs": "Hello"}, True),
    ("GenerateRequest", {"inputs": "Hello", "parameters": None, "unknown": 1}, True),
    ("GenerateRequest", _params(temperature=None, top_p=None, stop=None, seed=None, grammar=None), True),
    (
        "GenerateRequest",
        _params(
            do_sample=True,
            temperature=0.01,
            top_k=1,
            top_p=0.99,
            typical_p=0.5,
            repetition_penalty=1.2,
            frequency_penalty=-2,
            seed=2**64 - 1,
            truncate=1,
            max_new_tokens=1,
            top_n_tokens=0,
            stop=["\n"],
            watermark=True,
            details=True,
            decoder_input_details=True,
            return_full_text=True,
            adapter_id=None,
        ),
        True,
    ),
    ("GenerateRequest", _params(best_of=2, do_sample=True), True),
    ("GenerateRequest", _params(best_of=0), False),
    ("GenerateRequest", {"parameters": {"max_new_tokens": 20}}, False),
    ("GenerateRequest", {"inputs": ""}, False),
    ("GenerateRequest", {"inputs": 5}, False),
    ("GenerateRequest", ["Hello"], False),
    ("GenerateRequest", {"inputs": "Hello", "parameters": []}, False),
    ("GenerateRequest", _params(top_p=1.5), False),
    ("GenerateRequest", _params(top_p=1.0), False),
    ("GenerateRequest", _params(top_p=0), False),
    ("GenerateRequest", _params(typical_p=1), False),
    ("GenerateRequest", _params(temperature=0), False),
    ("GenerateRequest", _params(repetition_penalty=0), False),
    ("GenerateRequest", _params(frequency_penalty=2.5), False),
    ("GenerateRequest", _params(top_k=0), False),
    ("GenerateRequest", _params(max_new_tokens=0), False),
    ("GenerateRequest", _params(max_new_tokens=1.5), False),
    ("GenerateRequest", _params(truncate=0), False),
    ("GenerateRequest", _params(seed=-1), False),
    ("GenerateRequest", _params(seed=2**64), False),
    ("GenerateRequest", _params(best_of=-1), False),
    ("GenerateRequest", _params(top_n_tokens=-1), False),
    ("GenerateRequest", _params(do_sample="yes"), False),
    ("GenerateRequest", _params(stop="\n"), False),
    ("GenerateRequest", _params(stop=[1]), False),
    ("GenerateRequest", _params(grammar={"type": "regex", "value": "a+"}), False),
    ("GenerateRequest", _params(adapter_id="my-lora"), False),
    ("GenerateRequest", _params(top_k=-1), False),
    ("CompatGenerateRequest", {"inputs": "Hello", "stream": False}, True),
    # TGI's and OpenAI's docs
    ("ChatRequest", {"model": "tgi", "messages": CHAT, "stream": True, "max_tokens": 20}, True),
    ("ChatRequest", {"model": "gpt-4o", "messages": [{"role": "developer", "content": "Hi"}]}, True),
    ("ChatRequest", {"messages": [{"role": "user", "content": [{"type": "text", "text": "Hi"}]}]}, True),
    ("ChatRequest", {"messages": [{"role": "user"}], "temperature": 0, "top_p": 1.5}, True),
    (
        "ChatRequest",
        {
            "messages": CHAT,
            "presence_penalty": 0,
            "logit_bias": {},
            "best_of": 1,
            "n": 2,
            "stop": ["a", ""],
            "seed": 1,
            "logprobs": True,
            "top_logprobs": 2,
            "response_format": {"type": "text"},
            "tool_choice": "none",
            "max_completion_tokens": 5,
            "min_tokens": 2,
            "ignore_eos": True,
            "stream_options": {"include_usage": True},
        },
        True,
    ),
    ("ChatRequest", {"messages": CHAT, "stop": "x", "top_p": 0.5, "frequency_penalty": 2}, True),
    ("ChatRequest", {"model": "tgi"}, False),
    ("ChatRequest", {"messages": []}, False),
    ("ChatRequest", {"messages": [{"content": "Hi"}]}, False),
    ("ChatRequest", {"messages": [{"role": "user", "content": 5}]}, False),
    ("ChatRequest", {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}, False),
    ("ChatRequest", {"messages": CHAT, "presence_penalty": 1}, False),
    ("ChatRequest", {"messages": CHAT, "logit_bias": {"1": 2}}, False),
    ("ChatRequest", {"messages": CHAT, "best_of": 2}, False),
    ("ChatRequest", {"messages": CHAT, "n": 0}, False),
    ("ChatRequest", {"messages": CHAT, "temperature": -1}, False),
    ("ChatRequest", {"messages": CHAT, "top_p": 0}, False),
    ("ChatRequest", {"messages": CHAT, "frequency_penalty": 3}, False),
    ("ChatRequest", {"messages": CHAT, "response_format": {"type": "json_object"}}, False),
    ("ChatRequest", {"messages": CHAT, "tool_choice": "required"}, False),
    ("ChatRequest", {"messages": CHAT, "max_tokens": 0}, False),
    ("ChatRequest", {"messages": CHAT, "top_logprobs": -1, "logprobs": True}, False),
    ("ChatRequest", {"messages": CHAT, "seed": -1}, False),
    ("ChatRequest", {"messages": CHAT, "stream": "yes"}, False),
    ("ChatRequest", {"messages": CHAT, "min_tokens": -1}, False),
    ("CompletionRequest", {"model": "tgi", "prompt": "What is Deep Learning?", "max_tokens": 20, "seed": 42}, True),
    ("CompletionRequest", {"model": "gpt-3.5-turbo-instruct", "prompt": "Say this is a test", "temperature": 0}, True),
    ("CompletionRequest", {"prompt": ["a", "b"], "echo": True, "suffix": None}, True),
    ("CompletionRequest", {"prompt": [1, 2, 3], "logprobs": 2}, True),
    ("CompletionRequest", {"prompt": [[1, 2], [3]], "n": 2}, True),
    ("CompletionRequest", {"max_tokens": 5}, False),
    ("CompletionRequest", {"prompt": []}, False),
    ("CompletionRequest", {"prompt": ""}, False),
    ("CompletionRequest", {"prompt": [[]]}, False),
    ("CompletionRequest", {"prompt": [1, "a"]}, False),
    ("CompletionRequest", {"prompt": [-1]}, False),
    ("CompletionRequest", {"prompt": "a", "suffix": "b"}, False),
    ("CompletionRequest", {"prompt": "a", "max_tokens": 0}, False),
    ("CompletionRequest", {"prompt": "a", "echo": "yes"}, False),
    ("CompletionRequest", {"prompt": "a", "logprobs": -1}, False),
]


@pytest.mark.parametrize(("schema", "body", "accepted"), CASES)
def test_request_schema_agrees_with_the_code(schema, body, accepted):
    assert _code_accepts(schema, body) == accepted, "the case is wrong about the code"
    errors = [e.message for e in _schema(schema).iter_errors(body)]
    assert (not errors) == accepted, errors


def test_request_examples_in_the_document_are_valid_and_accepted():
    examples = 0
    for path, item in DOC["paths"].items():
        for op in item.values():
            if "requestBody" not in op:
                continue
            media = op["requestBody"]["content"]["application/json"]
            schema = media["schema"]["$ref"].rsplit("/", 1)[1]
            for name, example in media["examples"].items():
                _schema(schema).validate(example["value"])
                if schema in PARSERS:
                    assert _code_accepts(schema, example["value"]), (path, name)
                examples += 1
    assert examples >= 8


# ---------------------------------------------------------------------------------------------
# Response schemas against the code that builds responses


def _token(i: int, logprob: float = -0.5, special: bool = False) -> Token:
    return Token(i, f"t{i}", logprob, special)


def _events() -> list[TokenEvent]:
    """Two tokens with alternatives, then EOS (special, with a non-finite logprob) and the prompt's logprobs."""
    events = [TokenEvent(_token(i), [_token(i), _token(9, float("-inf"))]) for i in (65, 66)]
    prefill = [_token(1, float("nan"), special=True), _token(72, -3.5)]
    return [*events, TokenEvent(_token(2, float("-inf"), special=True), [], "eos_token", "t65t66", prefill)]


@pytest.mark.parametrize("details", [False, True])
def test_generate_and_stream_responses_match_their_schemas(details):
    events = _events()
    body = generate_json(events, "Hello", details, 42 if details else None)
    if details:  # as server._generate adds them with best_of > 1
        body["details"]["best_of_sequences"] = [
            {"generated_text": "x", **generate_json(events, "", True, 7)["details"]}
        ]
    _schema("GenerateResponse").validate(body)
    for index, event in enumerate(events, 1):
        _schema("GenerateStreamEvent").validate(stream_json(index, event, "", details, None, 5))
    _schema("GenerateStreamEvent").validate(error_json("Request failed during generation: boom", "generation"))


def _openai_plans(stream: bool) -> tuple[oai.Plan, oai.Plan]:
    """A chat and a completion request with two choices each and logprobs."""
    options = {"n": 2, "stream": stream, "stream_options": {"include_usage": True}}
    chat = parse_chat({"messages": CHAT, "logprobs": True, "top_logprobs": 2, **options}, TOKENIZER, LIMITS)
    completion = parse_completion({"prompt": "Hello", "logprobs": 2, "echo": False, **options}, TOKENIZER, LIMITS)
    return chat, completion


def test_openai_responses_match_their_schemas():
    chat, completion = _openai_plans(stream=False)
    results = [_events(), _events()]
    body = oai.chat_response(chat, oai.envelope("chat.completion", "test-model"), results)
    _schema("ChatCompletion").validate(body)
    body = oai.completion_response(completion, oai.envelope("text_completion", "test-model"), results)
    _schema("Completion").validate(body)


def test_openai_stream_events_match_their_schemas():
    chat, completion = _openai_plans(stream=True)
    for chunks, schema in (
        (_ChatChunks(chat, oai.envelope("chat.completion.chunk", "test-model")), "ChatCompletionStreamEvent"),
        (_CompletionChunks(completion, oai.envelope("text_completion", "test-model")), "CompletionStreamEvent"),
    ):
        events = [*chunks.opening(), *(chunks.token(i % 2, e) for i, e in enumerate(_events()))]
        events.append({**chunks.env, "choices": [], "usage": oai.usage(chunks.plan, 3)})  # as openai_api._stream
        events += [{"error": {"message": "boom", "http_status_code": 424}}, "[DONE]"]
        for event in events:
            _schema(schema).validate(event)


# ---------------------------------------------------------------------------------------------
# Over HTTP


async def test_get_openapi_json_on_a_minimal_app():
    app = web.Application()
    add_openapi_routes(app)
    async with TestClient(TestServer(app)) as client:
        for path in ("/openapi.json", "/api-doc/openapi.json"):
            response = await client.get(path)
            assert response.status == 200
            assert response.content_type == "application/json"
            doc = await response.json()
            assert doc["openapi"].startswith("3.1")
            assert doc["paths"].keys() == DOC["paths"].keys()


def _declared_error_type(path: str, method: str, status: int) -> str | None:
    """The `error_type` the document gives for `status`; None where only `default` covers it."""
    responses = DOC["paths"][path][method]["responses"] if path in DOC["paths"] else {}
    if str(status) not in responses:
        return None
    name = responses[str(status)]["$ref"].rsplit("/", 1)[1]
    return DOC["components"]["responses"][name]["content"]["application/json"]["example"]["error_type"]


@pytest.mark.parametrize(
    ("method", "path", "body", "auth", "status"),
    [
        ("post", "/generate", {"inputs": "Hello"}, False, 401),
        ("post", "/tokenize", {"inputs": "Hello"}, False, 401),
        ("post", "/v1/chat/completions", b"{not json", True, 400),
        ("post", "/v1/completions", "text/plain", True, 415),
        ("post", "/generate", b'{"inputs": "' + b"x" * 2000 + b'"}', True, 413),
        ("post", "/generate", {"inputs": 5}, True, 422),
        ("post", "/tokenize", {"inputs": ""}, True, 422),
        ("get", "/nowhere", None, False, 404),
    ],
)
async def test_errors_of_the_real_app_are_declared(method, path, body, auth, status):
    """The stand-in state would fail any request that reaches the model: these stop before it."""
    app = build_app(_stand_in_state(), payload_limit=1000, api_key="secret")
    headers = {"Authorization": "Bearer secret"} if auth else {}
    if isinstance(body, str):  # a content type: a valid JSON body under it
        headers["Content-Type"] = body
        body = b'{"prompt": "Hi"}'
    elif isinstance(body, bytes):
        headers["Content-Type"] = "application/json"
    kwargs = {"data": body} if isinstance(body, bytes) else {"json": body}
    async with TestClient(TestServer(app)) as client:
        response = await client.request(method.upper(), path, headers=headers, **kwargs)
        assert response.status == status
        error = await response.json()
    _schema("ErrorResponse").validate(error)
    declared = _declared_error_type(path, method, status)
    assert declared == error["error_type"] or (declared is None and status == 404)


async def test_get_routes_of_the_real_app_match_their_schemas():
    app = build_app(_stand_in_state(), payload_limit=1000)
    async with TestClient(TestServer(app)) as client:
        for path, schema in (("/info", "Info"), ("/v1/models", "ModelList")):
            response = await client.get(path)
            assert response.status == 200
            _schema(schema).validate(await response.json())
        response = await client.post("/tokenize", json={"inputs": "Hello"})
        _schema("TokenizeResponse").validate(await response.json())
        assert (await client.get("/health")).status == 200
    async with TestClient(TestServer(build_app(_stand_in_state(is_healthy=False), 1000))) as client:
        response = await client.get("/health")
        assert response.status == 503
        assert "503" in DOC["paths"]["/health"]["get"]["responses"]
        _schema("ErrorResponse").validate(await response.json())


async def test_overload_is_declared_429():
    app = build_app(_stand_in_state(max_concurrent_requests=0), payload_limit=1000)
    async with TestClient(TestServer(app)) as client:
        response = await client.post("/generate", json={"inputs": "Hello"})
        assert response.status == 429
        assert await response.json() == {"error": "Model is overloaded", "error_type": "overloaded"}
        response = await client.get("/openapi.json")
        assert response.status == 200
        assert "test-model" in (await response.json())["info"]["description"]
    assert "429" in DOC["paths"]["/generate"]["post"]["responses"]
