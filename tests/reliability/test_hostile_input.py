"""Hostile input on every POST route: malformed and adversarial bodies get a documented 4xx with the
JSON error shape (or, when they happen to be valid, a complete 200), never a 5xx, a hang or a crash.

A property-based fuzz (hypothesis, derandomized: the same examples on every run) plus a fixed list
of the nastiest bodies. Bodies that are otherwise valid always ask for at most 4 new tokens.
"""

import json
import math

import pytest
import requests
from hypothesis import HealthCheck, Phase, given, settings

from tests.reliability.bodies import CONTENT_TYPES, POST_ROUTES, encode, hostile_request
from tests.reliability.conftest import scaled

STREAM_ROUTES = {"/generate_stream"}
TIMEOUT = (5, 60)  # connect, read: a hang fails the test instead of blocking it


@pytest.fixture(scope="module")
def documented(rel_server) -> dict[str, set[int]]:
    """Status codes /openapi.json documents for each POST route."""
    doc = requests.get(rel_server.url + "/openapi.json", timeout=10).json()
    return {route: {int(s) for s in doc["paths"][route]["post"]["responses"] if s.isdigit()} for route in POST_ROUTES}


def _is_stream(route: str, body: object) -> bool:
    if route in STREAM_ROUTES:
        return True
    return (
        route in ("/", "/v1/chat/completions", "/v1/completions")
        and isinstance(body, dict)
        and body.get("stream") is True
    )


def send(url: str, route: str, data: bytes, content_type: str | None = "application/json") -> requests.Response:
    headers = {} if content_type is None else {"Content-Type": content_type}
    return requests.post(url + route, data=data, headers=headers, timeout=TIMEOUT, stream=True)


def check_answer(response: requests.Response, route: str, documented: dict[str, set[int]], body: object = None):
    """A documented 4xx with `{"error", "error_type"}`, or a complete 200; read in full (bounded by TIMEOUT)."""
    with response:
        status = response.status_code
        assert status in documented[route], f"{route}: undocumented status {status}: {response.text[:300]}"
        assert status in (200, 400, 413, 415, 422), f"{route}: {status}: {response.text[:300]}"
        if status != 200:
            error = response.json()
            assert isinstance(error, dict) and set(error) == {"error", "error_type"}, error
            assert isinstance(error["error"], str) and isinstance(error["error_type"], str), error
            return status
        if response.headers["Content-Type"].startswith("text/event-stream"):
            events = [line[5:].strip() for line in response.iter_lines(decode_unicode=True) if line.startswith("data:")]
            assert events, f"{route}: an empty stream"
            if route.startswith("/v1/"):
                assert events[-1] == "[DONE]", events[-3:]
                assert all("error" not in json.loads(e) for e in events[:-1]), events[-3:]
            else:
                last = json.loads(events[-1])
                assert "error" not in last and last["generated_text"] is not None, last
        else:
            assert isinstance(response.json(), (dict, list))
        return status


EXAMPLES = scaled(300, 3000)


@pytest.mark.timeout(scaled(600, 3600))
def test_fuzzed_bodies_get_documented_answers(rel_server, documented):
    seen: dict[int, int] = {}

    @settings(
        max_examples=EXAMPLES,
        derandomize=True,
        database=None,
        deadline=None,
        suppress_health_check=list(HealthCheck),
        phases=[Phase.explicit, Phase.generate],  # no shrinking: each step is a request; the raw example is shown
    )
    @given(hostile_request())
    def fuzz(request):
        route, data, content_type, body = request
        status = check_answer(send(rel_server.url, route, data, content_type), route, documented, body)
        seen[status] = seen.get(status, 0) + 1

    fuzz()
    print(f"fuzz: {EXAMPLES} examples, statuses {dict(sorted(seen.items()))}")
    assert all(seen.get(s) for s in (200, 400, 415, 422)), seen  # the fuzz reached every kind of answer
    _still_serves(rel_server.url)


def _still_serves(url: str) -> None:
    assert requests.get(url + "/health", timeout=15).status_code == 200
    r = requests.post(url + "/generate", json={"inputs": "Hello", "parameters": {"max_new_tokens": 2}}, timeout=60)
    assert r.status_code == 200 and r.json()["generated_text"]


# ------------------------------------------------------------------------------------------------
# The nastiest bodies, on every route, every run

DEEP = b"[" * 100_000 + b"]" * 100_000
FIXED = {
    "deep nesting (100k lists)": (DEEP, 400),
    "deep nesting inside an object": (b'{"inputs": "x", "messages": ' + DEEP + b"}", 400),
    "invalid UTF-8": (b'{"inputs": "\xff\xfe", "prompt": "\xc3\x28"}', 400),
    "escaped lone surrogate": (
        b'{"inputs": "a\\ud800b", "prompt": "\\udfff", "messages": [{"role": "user", "content": "\\ud800"}]}',
        400,
    ),
    "truncated JSON": (b'{"inputs": "x", "parameters": {', 400),
    "a number of 5000 digits": (b'{"inputs": 1' + b"0" * 5000 + b"}", 400),
    "JSON null": (b"null", 422),
    "JSON array": (b'[{"inputs": "x"}]', 422),
    "JSON string": (b'"hello"', 422),
    "JSON number": (b"1e308", 422),
    "NaN literal": (b"NaN", 422),
    "empty object": (b"{}", 422),
}


@pytest.mark.parametrize("route", POST_ROUTES)
@pytest.mark.parametrize("case", sorted(FIXED))
def test_nasty_bodies(rel_server, documented, route, case):
    data, expected = FIXED[case]
    r = send(rel_server.url, route, data)
    assert check_answer(r, route, documented) == expected, case


@pytest.mark.parametrize(
    ("route", "body"),
    [
        ("/generate", {"inputs": "x", "parameters": {"max_new_tokens": 2**70}}),
        ("/generate", {"inputs": "x", "parameters": {"max_new_tokens": 1e308}}),
        ("/generate", {"inputs": "x", "parameters": {"max_new_tokens": -1}}),
        ("/generate", {"inputs": "x", "parameters": {"max_new_tokens": 2, "seed": 2**70}}),
        ("/generate", {"inputs": "x", "parameters": {"max_new_tokens": 2, "temperature": math.nan}}),
        ("/generate", {"inputs": "x", "parameters": {"max_new_tokens": 2, "top_p": math.inf}}),
        ("/generate", {"inputs": "x", "parameters": {"max_new_tokens": 2, "truncate": 2**70}}),
        ("/generate", {"inputs": "x", "parameters": {"max_new_tokens": 2, "best_of": 2**70, "do_sample": True}}),
        ("/generate_stream", {"inputs": "", "parameters": {"max_new_tokens": 2}}),
        ("/generate", {"inputs": "\x16", "parameters": {"max_new_tokens": 2}}),  # no token at all
        ("/generate_stream", {"inputs": "\x16\x16", "parameters": {"max_new_tokens": 2}}),
        ("/v1/completions", {"prompt": "\x16", "max_tokens": 2}),
        ("/", {"inputs": "x", "stream": True, "parameters": {"max_new_tokens": 0}}),
        ("/tokenize", {"inputs": ""}),
        ("/v1/completions", {"prompt": [], "max_tokens": 2}),
        ("/v1/completions", {"prompt": [[2**70]], "max_tokens": 2}),
        ("/v1/completions", {"prompt": "x", "max_tokens": 2, "n": 2**70}),
        ("/v1/completions", {"prompt": ["x"] * 100, "max_tokens": 2}),
        ("/v1/completions", {"prompt": [0] * 5000, "max_tokens": 2}),
        ("/v1/chat/completions", {"messages": [], "max_tokens": 2}),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "max_tokens": -(2**70)}),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "max_tokens": 2, "n": 0}),
        ("/v1/chat/completions", {"messages": [{"content": "x"}], "max_tokens": 2}),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "image_url"}]}], "max_tokens": 2}),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "max_tokens": 2, "top_p": math.nan}),
    ],
)
def test_adversarial_values_are_422(rel_server, documented, route, body):
    r = send(rel_server.url, route, encode(body))
    assert check_answer(r, route, documented) == 422


@pytest.mark.parametrize("route", POST_ROUTES)
def test_valid_bodies_are_served_only_when_declared_json(rel_server, documented, route):
    """A JSON content type (any parameters) is served; any other, or none, is 415."""
    body = {
        "/tokenize": {"inputs": "hi"},
        "/v1/chat/completions": {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
        "/v1/completions": {"prompt": "hi", "max_tokens": 2},
    }.get(route, {"inputs": "hi", "parameters": {"max_new_tokens": 2}})
    for content_type in CONTENT_TYPES:
        status = check_answer(send(rel_server.url, route, encode(body), content_type), route, documented)
        declared_json = content_type is not None and content_type.split(";")[0] == "application/json"
        assert status == (200 if declared_json else 415), (content_type, status)
