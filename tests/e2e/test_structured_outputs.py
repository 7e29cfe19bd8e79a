"""Constrained generation against a live server, from the clients people use: every constrained
output parses and validates against its schema (jsonschema), every regex output full-matches."""

import json
import re

import huggingface_hub
import jsonschema
import openai
import pytest
import requests
from huggingface_hub import InferenceClient

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 24},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "city": {"type": "string", "enum": ["Paris", "London", "Tokyo"]},
    },
    "required": ["name", "age", "city"],
    "additionalProperties": False,
}
CODE = r"[A-Z]{3}-[0-9]{2,4}"
ASK = [{"role": "user", "content": "Invent a person: give a name, an age and a city."}]


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=120)


@pytest.fixture
def hub(server, monkeypatch) -> InferenceClient:
    return inference_client(server, monkeypatch)


def inference_client(server, monkeypatch) -> InferenceClient:
    """huggingface_hub's client of the server. `make` sets HF_HUB_OFFLINE=1 (no hub is reachable),
    which also stops the client reaching a local server: the test lifts it for the client alone."""
    monkeypatch.setattr(huggingface_hub.constants, "is_offline_mode", lambda: False)
    return InferenceClient(base_url=server.url, timeout=120)


def _person(text: str) -> dict:
    person = json.loads(text)
    jsonschema.validate(person, PERSON)
    return person


def _json_schema(schema: dict) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "person", "schema": schema, "strict": True}}


def test_openai_json_schema(client):
    r = client.chat.completions.create(
        model="smol", messages=ASK, response_format=_json_schema(PERSON), max_tokens=80, temperature=0
    )
    assert r.choices[0].finish_reason == "stop"
    _person(r.choices[0].message.content)


def test_openai_json_schema_streamed_and_sampled(client):
    stream = client.chat.completions.create(
        model="smol",
        messages=ASK,
        response_format=_json_schema(PERSON),
        max_tokens=80,
        temperature=1.0,
        seed=7,
        n=2,
        stream=True,
    )
    texts, finishes = ["", ""], {}
    for chunk in stream:
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
            if choice.finish_reason:
                finishes[choice.index] = choice.finish_reason
    assert finishes == {0: "stop", 1: "stop"}
    for text in texts:
        _person(text)


def test_openai_json_object(client):
    r = client.chat.completions.create(
        model="smol",
        messages=[{"role": "user", "content": "Answer in JSON: what is the capital of France?"}],
        response_format={"type": "json_object"},
        max_tokens=200,
        temperature=0,
    )
    if r.choices[0].finish_reason == "stop":  # a free-form object may outgrow max_tokens
        assert isinstance(json.loads(r.choices[0].message.content), dict)
    else:
        assert r.choices[0].message.content.lstrip().startswith("{")


def test_openai_completion_with_a_regex(client):
    r = client.completions.create(
        model="smol",
        prompt="Flight code:",
        max_tokens=16,
        temperature=0,
        extra_body={"response_format": {"type": "regex", "value": CODE}},
    )
    assert re.fullmatch(CODE, r.choices[0].text), r.choices[0].text


def test_tgi_grammar_over_http(server):
    for grammar, check in (
        ({"type": "json", "value": PERSON}, _person),
        ({"type": "regex", "value": CODE}, lambda text: re.fullmatch(CODE, text) or pytest.fail(text)),
    ):
        body = {"inputs": "Flight code or person:", "parameters": {"grammar": grammar, "max_new_tokens": 80}}
        r = requests.post(server.url + "/generate", json=body, timeout=120)
        assert r.status_code == 200, r.text
        check(r.json()["generated_text"])


def test_inference_client_text_generation_grammar(hub):
    text = hub.text_generation("A person, as JSON:", grammar={"type": "json", "value": PERSON}, max_new_tokens=80)
    _person(text)
    text = hub.text_generation("Flight code:", grammar={"type": "regex", "value": CODE}, max_new_tokens=16)
    assert re.fullmatch(CODE, text), text


def test_invalid_constraints_are_refused_with_the_reason(server, client):
    body = {"inputs": "x", "parameters": {"grammar": {"type": "regex", "value": "[0-9"}}}
    r = requests.post(server.url + "/generate", json=body, timeout=30)
    assert r.status_code == 422 and r.json()["error"].startswith("Input validation error: invalid regex")
    with pytest.raises(openai.UnprocessableEntityError) as e:
        client.chat.completions.create(model="smol", messages=ASK, response_format=_json_schema({"type": "nope"}))
    assert e.value.response.json()["error"] == "Input validation error: invalid JSON schema: Invalid type: nope"
