"""Tool calling on /v1/chat/completions without a server: the format chosen per model family, the
rendering with and without template support, the parsing of outputs, and streams whose deltas
reassemble to exactly the non-streamed calls however the text is split. The grammars are in
test_tool_grammars.py."""

import json
import random

import pytest

from router.core.engine import Token, TokenEvent
from router.http.errors import ApiError
from router.http.openai import responses as oai
from router.http.openai import tools
from router.http.openai.plan import Plan, parse_chat
from router.http.openai.routes import _ChatChunks
from tests.router.stand_ins import LIMITS, ByteTokenizer
from tests.router.tool_cases import (
    CLOCK,
    FORMATS,
    HERMES_TEMPLATE,
    LLAMA3_TEMPLATE,
    MISTRAL_TEMPLATE,
    PARIS,
    PLAIN_TEMPLATE,
    ROME,
    TOOLS,
    USER,
    WEATHER,
    call_text,
)

# Formats


@pytest.mark.parametrize(
    ("template", "config", "family"),
    [
        (HERMES_TEMPLATE, {}, "hermes"),
        (LLAMA3_TEMPLATE, {}, "llama3_json"),
        (MISTRAL_TEMPLATE, {}, "mistral"),
        (PLAIN_TEMPLATE, {}, "hermes"),
        (None, {}, "hermes"),
        (PLAIN_TEMPLATE, {"added_tokens_decoder": {"5": {"content": "[TOOL_CALLS]"}}}, "mistral"),
        (PLAIN_TEMPLATE, {"added_tokens_decoder": {"9": {"content": "<|python_tag|>"}}}, "llama3_json"),
        ("<|start_header_id|> ... <tool_call>", {}, "hermes"),  # Hermes on a Llama base
    ],
)
def test_the_format_follows_the_family(template, config, family):
    assert tools.call_format(template, config).family == family


@pytest.mark.parametrize(
    ("fmt", "text"),
    [
        (tools.HERMES, '<tool_call>\n{"name": "now", "arguments": {}}\n</tool_call>'),
        (tools.LLAMA3_JSON, '{"name": "now", "parameters": {}}'),
        (tools.MISTRAL, '[TOOL_CALLS] [{"name": "now", "arguments": {}}]'),
    ],
)
def test_each_format_writes_calls_as_its_family_does(fmt, text):
    assert call_text(fmt, CLOCK) == text


def test_several_calls_are_written_with_the_separator():
    assert call_text(tools.MISTRAL, CLOCK, CLOCK) == '[TOOL_CALLS] [{"name": "now", "arguments": {}}, ' + (
        '{"name": "now", "arguments": {}}]'
    )
    assert call_text(tools.LLAMA3_JSON, CLOCK, CLOCK).count("; ") == 1
    assert call_text(tools.HERMES, CLOCK, CLOCK).count("</tool_call>\n<tool_call>") == 1


# ---------------------------------------------------------------------------------------------
# Rendering


def _prompt(template: str, body: dict) -> str:
    tokenizer = ByteTokenizer()
    tokenizer.chat_template = template
    (valid,) = parse_chat({"messages": USER, **body}, tokenizer, LIMITS).prompts
    return valid.inputs


HISTORY = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Weather in Paris and Rome?"},
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
            {"id": "call_2", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Rome"}}},
        ],
    },
    {"role": "tool", "tool_call_id": "call_1", "content": "18C"},
    {"role": "tool", "tool_call_id": "call_2", "content": "25C"},
]


def test_a_template_with_tool_support_gets_the_tools_and_the_messages_as_they_are():
    prompt = _prompt(HERMES_TEMPLATE, {"tools": TOOLS, "messages": HISTORY})
    now = {"type": "function", "function": {"name": "now", "parameters": {"type": "object", "properties": {}}}}
    assert f"<tools>{json.dumps(WEATHER)}{json.dumps(now)}</tools>" in prompt  # absent parameters: any object
    assert "# Tools" not in prompt  # no system prompt of ours
    # the calls' arguments reach the template as objects (it writes them with tojson), tool results as they are
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>' in prompt
    assert '{"name": "get_weather", "arguments": {"city": "Rome"}}' in prompt
    assert "<|im_start|>tool\n18C[call_1]<|im_end|>\n<|im_start|>tool\n25C[call_2]<|im_end|>" in prompt


def test_tool_choice_none_renders_no_tools():
    assert "<tools>" not in _prompt(HERMES_TEMPLATE, {"tools": TOOLS, "tool_choice": "none"})
    assert "# Tools" not in _prompt(PLAIN_TEMPLATE, {"tools": TOOLS, "tool_choice": "none"})


def test_a_template_without_tool_support_gets_them_in_a_system_prompt():
    prompt = _prompt(PLAIN_TEMPLATE, {"tools": TOOLS})
    assert prompt.startswith("<|system|># Tools\n\nYou may call one or more functions")
    assert json.dumps(WEATHER) in prompt
    assert '<tool_call>\n{"name": <function-name>, "arguments": <arguments-json-object>}\n</tool_call>' in prompt
    assert prompt.endswith("<|user|>Weather in Paris?\n<|assistant|>")


def test_the_system_prompt_merges_with_the_first_system_message():
    prompt = _prompt(PLAIN_TEMPLATE, {"tools": TOOLS, "tool_choice": "required", "messages": HISTORY[:2]})
    assert prompt.startswith("<|system|>Be brief.\n\n# Tools\n\nYou must call at least one function.")
    assert prompt.count("<|system|>") == 1
    named = {"type": "function", "function": {"name": "now"}}
    prompt = _prompt(PLAIN_TEMPLATE, {"tools": TOOLS, "tool_choice": named, "parallel_tool_calls": False})
    assert "You must call the function `now`." in prompt


def test_past_calls_and_tool_results_are_text_for_a_template_without_tool_support():
    prompt = _prompt(PLAIN_TEMPLATE, {"messages": HISTORY})  # no tools in this request: still rendered
    calls = (
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome"}}\n</tool_call>'
    )
    results = "<tool_response>\n18C\n</tool_response>\n<tool_response>\n25C\n</tool_response>"
    conversation = "<|system|>Be brief.\n<|user|>Weather in Paris and Rome?\n"
    assert prompt == f"{conversation}<|assistant|>{calls}\n<|user|>{results}\n<|assistant|>"


def test_past_calls_are_written_in_the_models_format():
    messages = tools.messages_for_template(
        [{"role": "assistant", "content": "Let me check.", "tool_calls": HISTORY[2]["tool_calls"]}],
        None,
        tools.MISTRAL,
        template_has_tools=False,
    )
    assert messages == [
        {
            "role": "assistant",
            "content": 'Let me check.\n[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Paris"}}, '
            '{"name": "get_weather", "arguments": {"city": "Rome"}}]',
        }
    ]


# ---------------------------------------------------------------------------------------------
# Parsing


def _ids():
    counter = iter(range(1000))
    return lambda: f"call_{next(counter)}"


def _parse(fmt: tools.CallFormat, text: str) -> tuple[str | None, list[tuple[str, dict]]]:
    content, calls = tools.parse(fmt, text)
    return content, [(c.name, json.loads(c.arguments)) for c in calls]


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.family)
def test_calls_are_parsed_from_each_format(fmt):
    assert _parse(fmt, call_text(fmt, PARIS)) == (None, [PARIS])
    assert _parse(fmt, call_text(fmt, PARIS, CLOCK, ROME)) == (None, [PARIS, CLOCK, ROME])
    assert _parse(fmt, "Let me check.\n" + call_text(fmt, PARIS) + "\nOne moment.") == (
        "Let me check.\nOne moment.",
        [PARIS],
    )
    assert _parse(fmt, "  " + call_text(fmt, CLOCK) + "\n\n") == (None, [CLOCK])
    assert _parse(fmt, "Just text, no call.\n") == ("Just text, no call.\n", [])
    assert _parse(fmt, "") == ("", [])


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.family)
@pytest.mark.parametrize(
    "broken",
    [
        lambda call: call[: len(call) // 2],  # cut short (max_tokens)
        lambda call: call.replace('"city"', "city"),  # not JSON
        lambda call: call.replace('{"name": "get_weather"', '{"name": get_weather'),
        lambda call: call.replace('"get_weather", ', '"get_weather" '),
        lambda call: call.replace('"get_weather", ', '"get_weather", "id": 1, '),  # not the format's keys
        lambda call: call.replace('{"city": "Paris", "unit": "c"}', '"Paris"'),  # arguments not an object
        lambda call: call.replace('"c"}', '"c"]'),
    ],
)
def test_malformed_calls_are_returned_as_content(fmt, broken):
    text = "Hi " + broken(call_text(fmt, PARIS))
    assert _parse(fmt, text) == (text, [])
    assert _parse(fmt, call_text(fmt, CLOCK) + " then " + broken(call_text(fmt, PARIS))) == (
        call_text(fmt, CLOCK) + " then " + broken(call_text(fmt, PARIS)),
        [],
    )


def test_llama3_json_without_the_name_key_is_text():
    text = 'Here: {"function": "now", "parameters": {}}'
    assert _parse(tools.LLAMA3_JSON, text) == (text, [])


def test_the_arguments_are_the_generated_json_text():
    text = '<tool_call>\n{ "name" : "f",\n "arguments" : {"q": "a}b\\"{", "n": [1, {"x": []}]} }\n</tool_call>'
    _, (call,) = tools.parse(tools.HERMES, text)
    assert (call.name, call.arguments) == ("f", '{"q": "a}b\\"{", "n": [1, {"x": []}]}')
    assert call.id.startswith("call_") and len(call.id) == 29


def test_llama3_reads_parameters_or_arguments_and_the_python_tag():
    text = 'Sure. <|python_tag|>{"name": "now", "arguments": {}}; {"name": "now", "parameters": {"tz": "UTC"}}'
    assert _parse(tools.LLAMA3_JSON, text) == ("Sure.", [("now", {}), ("now", {"tz": "UTC"})])


def test_names_with_escapes_are_decoded():
    assert _parse(tools.MISTRAL, '[TOOL_CALLS] [{"name": "a\\u0062", "arguments": {}}]') == (None, [("ab", {})])


# ---------------------------------------------------------------------------------------------
# Streaming


def _stream(fmt: tools.CallFormat, pieces: list[str]) -> list[tools.Piece]:
    stream = tools.CallStream(fmt, _ids())
    out = [p for piece in pieces for p in stream.feed(piece)]
    return out + stream.finish()


def _reassembled(out: list[tools.Piece]) -> tuple[str | None, list[tuple[str, str, str]]]:
    """(content, [(id, name, arguments)]) as a client accumulates them."""
    content = "".join(p for p in out if isinstance(p, str))
    calls = {}
    for p in out:
        if isinstance(p, tools.CallStart):
            assert p.index == len(calls)  # calls start in order, each once
            calls[p.index] = [p.id, p.name, ""]
        elif isinstance(p, tools.ArgumentsDelta):
            calls[p.index][2] += p.text
    return (content or None) if calls else content, [tuple(c) for c in calls.values()]


def _splits(text: str) -> list[list[str]]:
    rng = random.Random(text)
    splits = [[c for c in text], [text]]  # one character at a time, and whole
    splits += [[text[:i], text[i:]] for i in range(1, len(text))]  # every two-piece split (inside markers too)
    for _ in range(20):
        cuts = sorted(rng.sample(range(1, len(text)), min(len(text) - 1, rng.randint(1, 12))))
        splits.append([text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])])
    return splits


STREAMED = [
    lambda fmt: call_text(fmt, PARIS),
    lambda fmt: "Let me check the weather for you.\n" + call_text(fmt, PARIS, CLOCK) + "\nDone!",
    lambda fmt: call_text(fmt, ("f", {"q": 'a}b"{\\', "deep": [[{"x": "]"}]], "emoji": "🌊"})),
    lambda fmt: "A brace { and a tag < and [ bracket, no call.",
    lambda fmt: call_text(fmt, PARIS) + "\n\n" + call_text(fmt, ROME),
]


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.family)
@pytest.mark.parametrize("make", STREAMED)
def test_streamed_deltas_reassemble_to_the_parsed_calls(fmt, make):
    text = make(fmt)
    content, calls = tools.parse(fmt, text, _ids())
    expected = (content, [(c.id, c.name, c.arguments) for c in calls])
    for pieces in _splits(text):
        out = _stream(fmt, pieces)
        assert _reassembled(out) == expected, pieces


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.family)
def test_a_possible_marker_is_held_back_and_calls_stream_as_they_come(fmt):
    stream = tools.CallStream(fmt, _ids())
    marker = fmt.markers[-1]
    assert stream.feed("Sure " + marker[:-1]) == ["Sure"]  # the space waits too: it may precede a call
    call = call_text(fmt, PARIS)
    rest = call[call.index(marker) + len(marker) - 1 :]
    head_end = rest.index('": {') + 4
    assert stream.feed(rest[:head_end]) == [tools.CallStart(0, "call_0", "get_weather"), tools.ArgumentsDelta(0, "{")]
    assert stream.feed(rest[head_end : head_end + 6]) == [tools.ArgumentsDelta(0, rest[head_end : head_end + 6])]
    assert all(not isinstance(p, str) for p in stream.feed(rest[head_end + 6 :]) + stream.finish())
    assert [(c.name, json.loads(c.arguments)) for c in stream.calls] == [PARIS] and not stream.malformed


def test_text_that_only_looks_like_a_marker_start_is_released():
    stream = tools.CallStream(tools.HERMES)
    assert stream.feed("a <tool") == ["a"]
    assert stream.feed("s> b") == [" <tools> b"]
    assert stream.finish() == []


# ---------------------------------------------------------------------------------------------
# Through the response builders and the SSE chunks


def _events(pieces: list[str], special: frozenset[str] = frozenset(), reason: str = "eos_token") -> list[TokenEvent]:
    """One event per piece (those in `special` as special tokens, out of the generated text), then EOS."""
    events = [TokenEvent(Token(i, p, -0.5, p in special), []) for i, p in enumerate(pieces)]
    generated = "".join(p for p in pieces if p not in special)
    return [*events, TokenEvent(Token(2, "</s>", -0.1, True), [], reason, generated)]


def _chat_plan(template: str, **fields) -> Plan:
    tokenizer = ByteTokenizer()
    tokenizer.chat_template = template
    return parse_chat({"messages": USER, "tools": TOOLS, **fields}, tokenizer, LIMITS)


def _chunks(plan: Plan, events: list[TokenEvent]) -> list[dict]:
    chunks = _ChatChunks(plan, oai.envelope("chat", "m"))
    sent = [*chunks.opening(), *(c for e in events for c in chunks.token(0, e))]
    return [json.loads(c.model_dump_json()) for c in sent]


def _from_chunks(chunks: list[dict]) -> tuple[str | None, list[dict], str]:
    """What a client accumulates from the deltas: content, tool_calls and the finish reason."""
    content, calls, reason = "", [], None
    for chunk in chunks:
        (choice,) = chunk["choices"]
        delta = choice["delta"]
        content += delta.get("content") or ""
        for call in delta.get("tool_calls", []):
            if "id" in call:
                assert (
                    call["index"] == len(calls) and call["function"]["arguments"] == "" and call["type"] == "function"
                )
                calls.append({"id": call["id"], "type": "function", "function": dict(call["function"])})
            else:
                assert set(call) == {"index", "function"} and set(call["function"]) == {"arguments"}
                calls[call["index"]]["function"]["arguments"] += call["function"]["arguments"]
        reason = choice["finish_reason"] or reason
    return (content or None) if calls else content, calls, reason


def _without_ids(calls: list[dict]) -> list[dict]:
    return [{k: v for k, v in c.items() if k != "id"} for c in calls]


@pytest.mark.parametrize(
    ("template", "fmt"),
    [(HERMES_TEMPLATE, tools.HERMES), (LLAMA3_TEMPLATE, tools.LLAMA3_JSON), (MISTRAL_TEMPLATE, tools.MISTRAL)],
)
@pytest.mark.parametrize("special", [False, True], ids=["text marker", "special marker"])
def test_chat_responses_carry_tool_calls_streamed_or_not(template, fmt, special):
    marker, calls = fmt.markers[0], call_text(fmt, PARIS, CLOCK)
    text = "Checking.\n" + ("" if calls.startswith(marker) else marker) + calls  # Llama 3: after <|python_tag|>
    pieces = [text[: text.index(marker)], marker, *text[text.index(marker) + len(marker) :]]
    events = _events(pieces, frozenset([marker]) if special else frozenset())
    plan = _chat_plan(template)
    body = json.loads(oai.ChatCompletion.of(plan, oai.envelope("chat", "m"), [events]).model_dump_json())
    (choice,) = body["choices"]
    message = choice["message"]
    assert choice["finish_reason"] == "tool_calls"
    assert message["content"] == "Checking."
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in message["tool_calls"]] == [
        PARIS,
        CLOCK,
    ]
    assert all(c["type"] == "function" and c["id"].startswith("call_") for c in message["tool_calls"])
    content, calls, reason = _from_chunks(_chunks(plan, events))
    assert (content, _without_ids(calls), reason) == ("Checking.", _without_ids(message["tool_calls"]), "tool_calls")


def test_only_calls_give_null_content_and_text_gives_no_tool_calls():
    plan = _chat_plan(PLAIN_TEMPLATE, tool_choice="required")
    events = _events(list(call_text(tools.HERMES, CLOCK)))
    body = json.loads(oai.ChatCompletion.of(plan, oai.envelope("chat", "m"), [events]).model_dump_json())
    assert body["choices"][0]["message"]["content"] is None
    events = _events(list("It is sunny."))
    body = json.loads(
        oai.ChatCompletion.of(_chat_plan(PLAIN_TEMPLATE), oai.envelope("chat", "m"), [events]).model_dump_json()
    )
    assert body["choices"][0] == {
        "index": 0,
        "message": {"role": "assistant", "content": "It is sunny."},
        "logprobs": None,
        "finish_reason": "stop",
    }
    assert _from_chunks(_chunks(_chat_plan(PLAIN_TEMPLATE), events)) == ("It is sunny.", [], "stop")


def test_a_call_cut_by_max_tokens_is_content_with_finish_reason_length():
    text = call_text(tools.HERMES, PARIS)[:40]
    plan = _chat_plan(PLAIN_TEMPLATE)
    events = _events(list(text), reason="length")
    (choice,) = oai.ChatCompletion.of(plan, oai.envelope("chat", "m"), [events]).choices
    assert (choice.message.content, choice.message.tool_calls, choice.finish_reason) == (text, None, "length")
    assert _from_chunks(_chunks(plan, events))[2] == "length"


def test_stop_sequences_are_cut_before_calls_are_parsed():
    plan = _chat_plan(PLAIN_TEMPLATE, stop=["STOP"])
    text = call_text(tools.HERMES, CLOCK) + "\nSTOP"  # the token completing the stop sequence ends the request
    events = [TokenEvent(Token(i, c, -0.5, False), []) for i, c in enumerate(text)]
    events[-1] = TokenEvent(events[-1].token, [], "stop_sequence", text)
    (choice,) = oai.ChatCompletion.of(plan, oai.envelope("chat", "m"), [events]).choices
    assert choice.message.content is None and choice.message.tool_calls[0].function.name == "now"
    content, calls, reason = _from_chunks(_chunks(plan, events))
    assert (content, len(calls), reason) == (None, 1, "tool_calls")


def test_each_chunk_carries_one_delta_and_the_token_logprobs_once():
    plan = _chat_plan(PLAIN_TEMPLATE, logprobs=True)
    text = call_text(tools.HERMES, CLOCK)
    events = _events([text[:20], text[20:]])  # the second token completes the head and the arguments
    chunks = _chunks(plan, events)[1:]
    with_logprobs = [c for c in chunks if c["choices"][0]["logprobs"] is not None]
    assert len(with_logprobs) == len(events)
    for chunk in chunks:
        delta = chunk["choices"][0]["delta"]
        assert len(delta) == 1 and ("content" in delta or len(delta["tool_calls"]) == 1)


def test_refusals_are_api_errors():
    with pytest.raises(ApiError) as e:
        _chat_plan(PLAIN_TEMPLATE, tool_choice={"type": "function", "function": {"name": "nope"}})
    assert e.value.status == 422 and e.value.error_type == "tool_error"
