"""The OpenAPI document: valid OpenAPI 3.1, every served route in it, its examples accepted, and
what the code sends (serialized, with its omitted and null fields) fitting the response schemas."""

import copy
import dataclasses
import json

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from jsonschema import Draft202012Validator
from openapi_spec_validator import OpenAPIV31SpecValidator
from openapi_spec_validator import validate as validate_spec
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

from router.core.engine import Token, TokenEvent
from router.http.app import build_app
from router.http.errors import ApiError
from router.http.middleware import GENERATION_ROUTES, PROTECTED_ROUTES
from router.http.openai import responses as oai
from router.http.openai.plan import Plan, parse_chat, parse_completion
from router.http.openai.routes import _ChatChunks, _CompletionChunks, _error_event, add_openai_routes
from router.http.openapi import add_openapi_routes, openapi_document
from router.http.responses import error_json
from router.http.tgi.protocol import validate
from router.http.tgi.responses import BestOfSequence, GenerateResponse, StreamResponse
from tests.router.stand_ins import LIMITS, ByteTokenizer, stand_in_state

DOC = openapi_document("test-model", "0.1.0")
URI = "urn:sluice:openapi"
REGISTRY = Registry().with_resource(URI, Resource.from_contents(DOC, default_specification=DRAFT202012))
EXPECTED_ROUTES = {
    ("POST", "/"),
    ("POST", "/generate"),
    ("POST", "/generate_stream"),
    ("POST", "/tokenize"),
    ("POST", "/v1/chat/completions"),
    ("POST", "/v1/completions"),
    ("GET", "/health"),
    ("GET", "/live"),
    ("GET", "/info"),
    ("GET", "/metrics"),
    ("GET", "/v1/models"),
    ("GET", "/openapi.json"),
    ("GET", "/api-doc/openapi.json"),
}


def _schema(name: str) -> Draft202012Validator:
    return Draft202012Validator({"$ref": f"{URI}#/components/schemas/{name}"}, registry=REGISTRY)


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
    routes = _routes(build_app(stand_in_state(), payload_limit=1000, api_key="secret"))
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
CHAT = [{"role": "system", "content": "You are a helpful assistant."}, {"role": "user", "content": "Hello!"}]


def _code_accepts(schema: str, body: object) -> bool:
    try:
        PARSERS[schema](copy.deepcopy(body))
    except ApiError:
        return False
    return True


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
    """Two tokens with alternatives (the first with the prompt's logprobs), then EOS (special, with a
    non-finite logprob)."""
    prefill = [_token(1, float("nan"), special=True), _token(72, -3.5)]
    prefill_top = [[], [_token(72, -3.5), _token(9, -4.0)]]
    events = [TokenEvent(_token(i), [_token(i), _token(9, float("-inf"))]) for i in (65, 66)]
    events[0] = dataclasses.replace(events[0], prefill=prefill, prefill_top_tokens=prefill_top)
    return [*events, TokenEvent(_token(2, float("-inf"), special=True), [], "eos_token", "t65t66")]


def _sent(body) -> object:
    """A body as the client receives it."""
    return json.loads(body.model_dump_json())


@pytest.mark.parametrize("details", [False, True])
def test_generate_and_stream_responses_match_their_schemas(details):
    events = _events()
    body = GenerateResponse.of(events, "Hello", details, 42 if details else None)
    if details:  # as the /generate route adds them with best_of > 1
        other = GenerateResponse.of(events, "", True, 7).details.model_dump(exclude={"best_of_sequences"})
        body.details.best_of_sequences = [BestOfSequence(generated_text="x", **other)]
    _schema("GenerateResponse").validate(_sent(body))
    assert ("details" in _sent(body)) == details
    for index, event in enumerate(events, 1):
        _schema("GenerateStreamEvent").validate(_sent(StreamResponse.of(index, event, "", details, None, 5)))
    _schema("GenerateStreamEvent").validate(
        json.loads(error_json("Request failed during generation: boom", "generation"))
    )


def _openai_plans(stream: bool) -> tuple[Plan, Plan]:
    """A chat and a completion request with two choices each and logprobs."""
    options = {"n": 2, "stream": stream, "stream_options": {"include_usage": True}}
    chat = parse_chat({"messages": CHAT, "logprobs": True, "top_logprobs": 2, **options}, TOKENIZER, LIMITS)
    completion = parse_completion({"prompt": "Hello", "logprobs": 2, "echo": False, **options}, TOKENIZER, LIMITS)
    return chat, completion


def test_openai_responses_match_their_schemas():
    chat, completion = _openai_plans(stream=False)
    results = [_events(), _events()]
    _schema("ChatCompletion").validate(_sent(oai.ChatCompletion.of(chat, oai.envelope("chat", "test-model"), results)))
    body = oai.Completion.of(completion, oai.envelope("text_completion", "test-model"), results)
    _schema("Completion").validate(_sent(body))


def test_openai_stream_events_match_their_schemas():
    chat, completion = _openai_plans(stream=True)
    for chunks, schema in (
        (_ChatChunks(chat, oai.envelope("chat", "test-model")), "ChatCompletionStreamEvent"),
        (_CompletionChunks(completion, oai.envelope("text_completion", "test-model")), "CompletionStreamEvent"),
    ):
        events = [*chunks.opening(), *(c for i, e in enumerate(_events()) for c in chunks.token(i % 2, e))]
        sent = [_sent(e) for e in events]
        sent += [json.loads(e.model_dump_json(exclude={"usage"})) for e in events]  # without include_usage
        sent.append(_sent(chunks.model(**chunks.env, choices=[], usage=oai.Usage.of(chunks.plan, 3))))
        sent += [json.loads(_error_event("boom", 424).decode().removeprefix("data: ")), "[DONE]"]
        for event in sent:
            _schema(schema).validate(event)


def _tool_call_events(text: str) -> list[TokenEvent]:
    """The text a character per token (so calls stream in pieces), then EOS."""
    events = [TokenEvent(_token(i), [_token(i)]) for i in range(len(text))]
    events = [dataclasses.replace(e, token=Token(i, c, -0.5, False)) for i, (e, c) in enumerate(zip(events, text))]
    return [*events, TokenEvent(_token(2, float("-inf"), special=True), [], "eos_token", text)]


TOOL_OUTPUTS = [
    'Let me check.\n<tool_call>\n{"name": "f", "arguments": {"a": 1}}\n</tool_call>\n'
    '<tool_call>\n{"name": "f", "arguments": {}}\n</tool_call>',  # content and two calls
    '<tool_call>\n{"name": "f", "arguments": {"a": [1, "}"]}}\n</tool_call>',  # calls only: null content
    "No call needed.",  # no tool_calls
    '<tool_call>\n{"name": "f", "arg',  # cut short: content
]


@pytest.mark.parametrize("stream", [False, True])
def test_chat_responses_with_tool_calls_match_their_schemas(stream):
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    body = {"messages": CHAT, "tools": tools, "n": len(TOOL_OUTPUTS), "logprobs": True, "stream": stream}
    plan = parse_chat(body, TOKENIZER, LIMITS)
    results = [_tool_call_events(text) for text in TOOL_OUTPUTS]
    env = oai.envelope("chat", "test-model")
    if not stream:
        sent = _sent(oai.ChatCompletion.of(plan, env, results))
        _schema("ChatCompletion").validate(sent)
        messages = [c["message"] for c in sent["choices"]]
        assert [len(m.get("tool_calls", [])) for m in messages] == [2, 1, 0, 0]
        assert [m["content"] for m in messages] == ["Let me check.", None, "No call needed.", TOOL_OUTPUTS[3]]
        return
    chunks = _ChatChunks(plan, env)
    events = [*chunks.opening(), *(c for i, r in enumerate(results) for e in r for c in chunks.token(i, e))]
    deltas = [_sent(e) for e in events]
    assert any("tool_calls" in d["choices"][0]["delta"] for d in deltas)
    for event in deltas:
        _schema("ChatCompletionStreamEvent").validate(event)


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
    app = build_app(stand_in_state(), payload_limit=1000, api_key="secret")
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
    app = build_app(stand_in_state(), payload_limit=1000)
    async with TestClient(TestServer(app)) as client:
        for path, schema in (("/info", "Info"), ("/v1/models", "ModelList")):
            response = await client.get(path)
            assert response.status == 200
            _schema(schema).validate(await response.json())
        response = await client.post("/tokenize", json={"inputs": "Hello"})
        _schema("TokenizeResponse").validate(await response.json())
        assert (await client.get("/health")).status == 200
    async with TestClient(TestServer(build_app(stand_in_state(is_healthy=False), 1000))) as client:
        response = await client.get("/health")
        assert response.status == 503
        assert "503" in DOC["paths"]["/health"]["get"]["responses"]
        _schema("ErrorResponse").validate(await response.json())


async def test_overload_is_declared_429():
    app = build_app(stand_in_state(max_concurrent_requests=0), payload_limit=1000)
    async with TestClient(TestServer(app)) as client:
        response = await client.post("/generate", json={"inputs": "Hello"})
        assert response.status == 429
        assert await response.json() == {"error": "Model is overloaded", "error_type": "overloaded"}
        response = await client.get("/openapi.json")
        assert response.status == 200
        assert "test-model" in (await response.json())["info"]["description"]
    assert "429" in DOC["paths"]["/generate"]["post"]["responses"]
