"""Tool calling on /v1/chat/completions against a live server, from the `openai` SDK and
`huggingface_hub`'s InferenceClient: calls are OpenAI's shape, their arguments valid under the
tool's schema, streamed deltas add up to the non-streamed calls."""

import json

import jsonschema
import openai
import pytest

from tests.e2e.test_structured_outputs import inference_client

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The current weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 30},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "description": "The current time in a time zone.",
        "parameters": {
            "type": "object",
            "properties": {"zone": {"type": "string", "maxLength": 30}},
            "required": ["zone"],
            "additionalProperties": False,
        },
    },
}
TOOLS = [WEATHER, TIME]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
ASK = [{"role": "user", "content": "What is the weather like in Paris today?"}]


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=120)


def _check_calls(calls) -> list[tuple[str, dict]]:
    """(name, arguments) of each call, after checking its shape and its arguments' schema."""
    out = []
    for call in calls:
        assert call.type == "function" and call.id
        arguments = json.loads(call.function.arguments)
        jsonschema.validate(arguments, SCHEMAS[call.function.name])
        out.append((call.function.name, arguments))
    return out


def _create(client, **kw):
    """One call at most unless asked (a forced list of calls goes on until max_tokens with a small model)."""
    return client.chat.completions.create(**{"model": "smol", "messages": ASK, "tools": TOOLS, "max_tokens": 60,
                                             "temperature": 0, "parallel_tool_calls": False, **kw})  # fmt: skip


@pytest.mark.parametrize("tool_choice", ["required", {"type": "function", "function": {"name": "get_time"}}])
def test_forced_calls_follow_the_schema(client, tool_choice):
    r = _create(client, tool_choice=tool_choice)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls"
    calls = _check_calls(choice.message.tool_calls)
    assert len(calls) == 1
    if isinstance(tool_choice, dict):
        assert calls[0][0] == "get_time"


@pytest.mark.parametrize("tool_choice", ["required", {"type": "function", "function": {"name": "get_weather"}}])
def test_streamed_calls_add_up_to_the_non_streamed_ones(client, tool_choice):
    whole = _create(client, tool_choice=tool_choice).choices[0]
    calls: dict[int, dict] = {}
    finish = None
    for chunk in _create(client, tool_choice=tool_choice, stream=True):
        for choice in chunk.choices:
            finish = choice.finish_reason or finish
            for delta in choice.delta.tool_calls or []:
                call = calls.setdefault(delta.index, {"id": None, "name": "", "arguments": ""})
                call["id"] = delta.id or call["id"]
                call["name"] += (delta.function.name or "") if delta.function else ""
                call["arguments"] += (delta.function.arguments or "") if delta.function else ""
    assert finish == "tool_calls"
    streamed = [(c["name"], json.loads(c["arguments"])) for _, c in sorted(calls.items())]
    assert streamed == _check_calls(whole.message.tool_calls)
    assert all(c["id"] for c in calls.values())


def test_auto_may_answer_in_text_and_does_not_force_json(client):
    r = _create(client, tool_choice="auto", messages=[{"role": "user", "content": "Say hello in French."}])
    choice = r.choices[0]
    if choice.message.tool_calls:  # the model chose a tool: the call is well formed
        assert choice.finish_reason == "tool_calls"
        _check_calls(choice.message.tool_calls)
    else:
        assert choice.finish_reason in ("stop", "length") and choice.message.content


def test_none_renders_no_tools_and_constrains_nothing(client):
    r = _create(client, tool_choice="none")
    assert r.choices[0].message.tool_calls is None and r.choices[0].message.content


def test_a_tool_result_goes_back_through_the_template(client):
    first = _create(client, tool_choice={"type": "function", "function": {"name": "get_weather"}}).choices[0]
    call = first.message.tool_calls[0]
    messages = [
        *ASK,
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": '{"temperature": 21, "sky": "clear"}'},
    ]
    r = client.chat.completions.create(model="smol", messages=messages, tools=TOOLS, max_tokens=30, temperature=0)
    assert r.choices[0].finish_reason in ("stop", "length", "tool_calls")


def _refusal(call) -> dict:
    with pytest.raises(openai.UnprocessableEntityError) as e:
        call()
    return e.value.response.json()


def test_bad_tools_are_refused_with_the_reason(client):
    error = _refusal(lambda: _create(client, tool_choice={"type": "function", "function": {"name": "unknown"}}))
    assert error["error_type"] == "tool_error" and "unknown" in error["error"]
    bad = {"type": "function", "function": {"name": "f", "parameters": {"type": "nope"}}}
    error = _refusal(lambda: _create(client, tools=[bad], tool_choice="required"))
    assert error["error_type"] == "tool_error" and "Invalid type" in error["error"]


def test_inference_client_chat_completion_with_tools(server, monkeypatch):
    hub = inference_client(server, monkeypatch)
    r = hub.chat_completion(
        messages=ASK,
        tools=TOOLS,
        tool_choice="required",
        max_tokens=60,
        temperature=0,
        extra_body={"parallel_tool_calls": False},
    )
    (call,) = r.choices[0].message.tool_calls[:1]
    arguments = call.function.arguments
    arguments = json.loads(arguments) if isinstance(arguments, str) else arguments
    jsonschema.validate(arguments, SCHEMAS[call.function.name])
