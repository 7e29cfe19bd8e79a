"""Every refusal of the OpenAI routes' request validation, with its message and error type, and what
an accepted request becomes; no server is started."""

import pytest

from router.core.engine import Token, TokenEvent
from router.http.errors import ApiError
from router.http.openai.plan import parse_chat, parse_completion
from router.http.openai.responses import ChoiceText, cut_at_stop
from tests.router.stand_ins import LIMITS, ByteTokenizer

TOKENIZER = ByteTokenizer()
CHAT = [{"role": "user", "content": "Hello!"}]
PARSERS = {"chat": parse_chat, "completion": parse_completion}


def _refusal(route: str, body: object) -> tuple[str, str]:
    """(error_type, message) of a refused body."""
    with pytest.raises(ApiError) as e:
        PARSERS[route](body, TOKENIZER, LIMITS)
    return e.value.error_type, e.value.message


def _chat(**fields) -> dict:
    return {"messages": CHAT, **fields}


def _completion(**fields) -> dict:
    return {"prompt": "Hello", **fields}


def _tool(**function) -> dict:
    return {"type": "function", "function": function}


TOOL = _tool(name="f")
TOOL_CHOICES = '`tool_choice` must be "none", "auto", "required" or {"type": "function", "function": {"name": ...}}'
NAME_RULE = "`name` must be 1 to 64 letters, digits, `_` or `-`. Given: "


@pytest.mark.parametrize("route", ["chat", "completion"])
@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"presence_penalty": 2.5}, "`presence_penalty` must be >= -2.0 and <= 2.0"),
        ({"logit_bias": {"1": 200}}, "`logit_bias` must be <= 100.0. Given: 200"),
        ({"logit_bias": {"x": 1}}, "`logit_bias` keys must be token ids in [0, 256). Given: 'x'"),
        ({"logit_bias": {"256": 1}}, "`logit_bias` keys must be token ids in [0, 256). Given: '256'"),
        ({"min_p": 1.5}, "`min_p` must be <= 1.0. Given: 1.5"),
        ({"stop_token_ids": [256]}, "`stop_token_ids` must be token ids in [0, 256)"),
        ({"stop_token_ids": [-1]}, "`stop_token_ids[0]` must be >= 0. Given: -1"),
        ({"best_of": 2}, "`best_of` != 1 is not supported"),
        ({"n": 0}, "`n` must be >= 1. Given: 0"),
        ({"seed": -1}, "`seed` must be an unsigned 64-bit integer"),
        ({"temperature": -1}, "`temperature` must be strictly positive"),
        ({"top_p": 0}, "`top_p` must be > 0.0 and < 1.0"),
        ({"frequency_penalty": 3}, "`frequency_penalty` must be >= -2.0 and <= 2.0"),
        ({"stream": "yes"}, "`stream` must be of type bool"),
        ({"stream_options": {"include_usage": 1}}, "`include_usage` must be of type bool"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "`stop` supports up to 4 stop sequences. Given: 5"),
        ({"stop": 5}, "`stop` must be of type string"),
        ({"max_tokens": 0}, "`max_tokens` must be >= 1. Given: 0"),
        ({"min_tokens": -1}, "`min_tokens` must be >= 0. Given: -1"),
        ({"max_tokens": 5, "min_tokens": 6}, "`min_tokens` must be >= 0 and <= `max_tokens` (5). Given: 6"),
        ({"ignore_eos": "yes"}, "`ignore_eos` must be of type bool"),
    ],
)
def test_refusals_of_the_shared_fields(route, fields, message):
    body = _chat(**fields) if route == "chat" else _completion(**fields)
    assert _refusal(route, body) == ("validation", message)


@pytest.mark.parametrize(
    ("body", "error_type", "message"),
    [
        ([CHAT], "validation", "the request body must be a JSON object"),
        ({"model": "tgi"}, "validation", "missing field `messages`"),
        ({"messages": []}, "validation", "`messages` must be a non-empty array"),
        ({"messages": [{"content": "Hi"}]}, "validation", "missing field `messages[0].role`"),
        (
            {"messages": [{"role": "user", "content": 5}]},
            "validation",
            '`messages[0].content` must be a string, null, or an array of {"type": "text", "text": "..."} parts',
        ),
        (
            {"messages": [CHAT[0], {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
            "validation",
            "`messages[1]`: image content is not supported: this model has no vision input",
        ),
        (_chat(logprobs=True, top_logprobs=6), "validation", "`top_logprobs` must be >= 0 and <= 5. Given: 6"),
        (_chat(top_logprobs=2), "validation", "`top_logprobs` needs `logprobs` set to true"),
        (
            _chat(response_format={"type": "xml"}),
            "validation",
            "`type` must be 'text', 'json_object', 'json_schema', 'json' or 'regex'. Given: xml",
        ),
        (
            _chat(response_format={"type": "json_schema"}),
            "validation",
            "`response_format` of type `json_schema` needs `json_schema`",
        ),
        (
            _chat(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "foo"}}}),
            "validation",
            "invalid JSON schema: Invalid type: foo",
        ),
        (
            _chat(response_format={"type": "regex", "value": "a("}),
            "validation",
            "invalid regex: at 1(8): invalid regex "
            '"a(" (in regex): regex parse error:\n    a(\n     ^\nerror: unclosed group\n'
            "   1 | start: /a(/\n              ^",
        ),
        (_chat(tool_choice="required"), "tool_error", 'Tool error: `tool_choice` "required" needs `tools`'),
        (
            _chat(tool_choice={"type": "function", "function": {"name": "f"}}),
            "tool_error",
            "Tool error: `tool_choice` (the function `f`) needs `tools`",
        ),
        (_chat(tools=[TOOL], tool_choice="sometimes"), "validation", TOOL_CHOICES),
        (_chat(tools=[TOOL], tool_choice={"type": "function"}), "validation", TOOL_CHOICES),
        (
            _chat(tools=[TOOL], tool_choice={"type": "function", "function": {"name": "g"}}),
            "tool_error",
            "Tool error: `tool_choice` names the function `g`, which is not in `tools`",
        ),
        (_chat(tools=TOOL), "validation", "`tools` must be of type array"),
        (
            _chat(tools=[{**TOOL, "type": "retrieval"}]),
            "validation",
            "`tools[0].type` must be 'function'. Given: retrieval",
        ),
        (_chat(tools=[{"type": "function"}]), "validation", "missing field `tools[0].function`"),
        (_chat(tools=[_tool(description="no name")]), "validation", "missing field `name`"),
        (_chat(tools=[_tool(name="get weather")]), "validation", f"{NAME_RULE}get weather"),
        (_chat(tools=[_tool(name="x" * 65)]), "validation", NAME_RULE + "x" * 65),
        (_chat(tools=[_tool(name="f", parameters="{}")]), "validation", "`parameters` must be of type object"),
        (
            _chat(tools=[_tool(name="f", parameters={"type": "string"})]),
            "tool_error",
            "Tool error: the parameters of `f` must describe a JSON object. Given type: 'string'",
        ),
        (
            _chat(tools=[_tool(name="f", parameters={"type": "foo"})], tool_choice="required"),
            "tool_error",
            "Tool error: the parameters of `f`: invalid JSON schema: Invalid type: foo",
        ),
        (
            _chat(tools=[_tool(name="f", parameters={"type": "object", "properties": {"a": {"type": "foo"}}})]),
            "tool_error",
            "Tool error: the parameters of `f`: invalid JSON schema: Invalid type: foo",
        ),
        (
            _chat(tools=[_tool(name="f", parameters={"type": "object", "required": 5})], tool_choice="none"),
            "tool_error",
            "Tool error: the parameters of `f`: invalid JSON schema: Expected array for 'required', got 5",
        ),
        (_chat(tools=[TOOL, TOOL]), "tool_error", "Tool error: two tools are named `f`"),
        (_chat(tools=[TOOL], parallel_tool_calls="yes"), "validation", "`parallel_tool_calls` must be of type bool"),
        (
            _chat(tools=[TOOL], response_format={"type": "json_object"}),
            "tool_error",
            "Tool error: `response_format` cannot constrain the output while tools may be called: "
            'set `tool_choice` to "none", or `response_format` to `text`',
        ),
        (
            _chat(messages=[{"role": "assistant", "tool_calls": [{"function": {"name": "f"}}]}]),
            "validation",
            "missing field `arguments`",
        ),
        (
            _chat(max_completion_tokens=2001),
            "validation",
            "`inputs` tokens + `max_new_tokens` must be <= 2000. Given: 24 `inputs` tokens and 2001 `max_new_tokens`",
        ),
    ],  # fmt: skip
)
def test_chat_refusals(body, error_type, message):
    assert _refusal("chat", body) == (error_type, message)


PROMPT_SHAPES = "`prompt` must be a string, an array of strings, of token ids, or of arrays of token ids"


@pytest.mark.parametrize(
    ("body", "error_type", "message"),
    [
        ({"max_tokens": 5}, "validation", "missing field `prompt`"),
        ({"prompt": []}, "empty_array", "Empty array detected. Do not use an empty array for the prompt."),
        ({"prompt": ""}, "validation", "`inputs` cannot be empty"),
        ({"prompt": [[]]}, "validation", "`inputs` cannot be empty"),
        ({"prompt": [1, "a"]}, "validation", PROMPT_SHAPES),
        ({"prompt": [-1]}, "validation", PROMPT_SHAPES),
        ({"prompt": 5}, "validation", PROMPT_SHAPES),
        ({"prompt": [256]}, "validation", "token ids must be in [0, 256)"),
        ({"prompt": [1] * 1001}, "validation", "`inputs` must have less than 1000 tokens. Given: 1001"),
        (
            {"prompt": ["a"] * 5},
            "batch size exceeded",
            "Number of prompts exceeds the maximum allowed batch size of 4",
        ),
        (
            _completion(suffix="!"),
            "suffix not supported",
            "Suffix is not supported and can be achieved by preprocessing the prompt.",
        ),
        (_completion(logprobs=6), "validation", "`logprobs` must be >= 0 and <= 5. Given: 6"),
        (_completion(echo="yes"), "validation", "`echo` must be of type bool"),
    ],
)
def test_completion_refusals(body, error_type, message):
    assert _refusal("completion", body) == (error_type, message)


def test_a_chat_request_becomes_tgi_parameters():
    body = _chat(
        model="gpt-4o",
        temperature=0.5,
        top_p=1,
        n=2,
        seed=7,
        stop="!",
        frequency_penalty=1,
        presence_penalty=0,
        logit_bias={},
        best_of=1,
        logprobs=True,
        top_logprobs=2,
        max_completion_tokens=9,
        max_tokens=3,
        min_tokens=2,
        ignore_eos=True,
        stream=True,
        stream_options={"include_usage": True},
        response_format={"type": "text"},
        tool_choice="none",
        messages=[{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}],
    )
    plan = parse_chat(body, TOKENIZER, LIMITS)
    (valid,) = plan.prompts
    assert valid.inputs == "<user>a\nb\n<assistant>"  # the text parts joined, through the template
    s = valid.sampling
    assert (s.do_sample, s.temperature, s.top_p, s.seed, s.frequency_penalty, s.top_n_tokens) == (
        True,
        0.5,
        1.0,
        7,
        1.0,
        2,
    )
    assert (valid.max_new_tokens, valid.min_new_tokens, valid.ignore_eos, valid.stop) == (9, 2, True, ["!"])
    assert (plan.model, plan.n, plan.stream, plan.include_usage, plan.logprobs) == ("gpt-4o", 2, True, True, True)
    choices = plan.choices()
    assert choices[0].sampling.seed == 7 and choices[1].sampling.seed != 7
    assert all(c.sampling.raw_logprobs for c in choices)


def test_temperature_zero_is_greedy_and_top_p_is_then_ignored():
    (valid,) = parse_chat(_chat(temperature=0, top_p=0.5), TOKENIZER, LIMITS).prompts
    assert not valid.sampling.do_sample and valid.sampling.top_p == 1.0


def test_completion_prompts_as_text_and_token_ids():
    plan = parse_completion({"prompt": [[72, 105], [33]], "n": 2, "echo": True}, TOKENIZER, LIMITS)
    assert [p.input_ids for p in plan.prompts] == [[72, 105], [33]]
    assert [p.inputs for p in plan.prompts] == ["Hi", "!"]
    assert plan.num_choices == 4 and plan.echo
    plan = parse_completion({"prompt": ["ab", "c"], "stop": ["", "x"]}, TOKENIZER, LIMITS)
    assert [p.input_ids for p in plan.prompts] == [[97, 98], [99]]
    assert plan.prompts[0].max_new_tokens == 16 and plan.stop == ["x"]
    (valid,) = parse_completion({"prompt": [1, 2, 3], "logprobs": 0}, TOKENIZER, LIMITS).prompts
    assert valid.input_ids == [1, 2, 3] and valid.sampling.top_n_tokens == 0


def test_response_formats_become_grammars():
    def grammar(response_format):
        return parse_chat(_chat(response_format=response_format), TOKENIZER, LIMITS).prompts[0].grammar

    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    assert grammar({"type": "text"}) == ""
    assert '"json_schema":{"type":"object"' in grammar({"type": "json_object"})
    named = grammar({"type": "json_schema", "json_schema": {"name": "a", "schema": schema, "strict": True}})
    assert '"required":["a"]' in named
    assert grammar({"type": "json", "value": schema}) == named  # TGI's shape
    assert "regex" in grammar({"type": "regex", "value": "[0-9]+"})


def test_openai_extensions_reach_the_request():
    body = _chat(presence_penalty=1.5, logit_bias={"7": -100, "9": 2.5}, min_p=0.1, stop_token_ids=[3, 4], min_tokens=1)
    (valid,) = parse_chat(body, TOKENIZER, LIMITS).prompts
    s = valid.sampling
    assert (s.presence_penalty, s.min_p, s.logit_bias) == (1.5, 0.1, ((7, -100.0), (9, 2.5)))
    assert valid.stop_token_ids == {3, 4} and valid.min_new_tokens == 1
    assert valid.generation().stop_token_ids == {3, 4}


def test_echo_with_logprobs_asks_for_the_prompt_logprobs():
    plan = parse_completion(_completion(echo=True, logprobs=3, max_tokens=1), TOKENIZER, LIMITS)
    (valid,) = plan.prompts
    request = valid.generation()
    assert request.prompt_logprobs and request.prompt_top_n == 3 and plan.echo and plan.logprobs
    (valid,) = parse_completion(_completion(logprobs=3), TOKENIZER, LIMITS).prompts
    assert not valid.generation().prompt_logprobs


def _token_events(pieces: list[str], generated: str, special: frozenset[str] = frozenset()) -> list[TokenEvent]:
    events = [TokenEvent(Token(i, p, -0.5, p in special), []) for i, p in enumerate(pieces)]
    return [*events, TokenEvent(Token(2, "</s>", -0.1, True), [], "eos_token", generated)]


@pytest.mark.parametrize(
    ("text", "stop"), [("ab, then", []), ("ab, then the STOP", ["STOP"]), ("ab", ["a longer stop"])]
)
def test_streamed_text_is_the_text_once_whatever_the_stop_sequences(text, stop):
    """The text shorter than the held-back length used to come out twice."""
    events = [TokenEvent(Token(i, c, -0.5, False), []) for i, c in enumerate(text)]
    events[-1] = TokenEvent(events[-1].token, [], "stop_sequence" if stop else "length", text)
    streamed = ChoiceText(stop)
    assert "".join(streamed.add(e) for e in events) == cut_at_stop(text, stop) == streamed.text


def test_kept_special_tokens_are_part_of_the_text():
    events = _token_events(["Hi ", "[TOOL_CALLS]", " [x]"], "Hi  [x]", frozenset(["[TOOL_CALLS]", "</s>"]))
    kept, plain = ChoiceText([], ("[TOOL_CALLS]",)), ChoiceText([])
    assert "".join(kept.add(e) for e in events) == "Hi [TOOL_CALLS] [x]" == kept.text
    assert "".join(plain.add(e) for e in events) == "Hi  [x]" == plain.text


def test_completions_take_a_response_format_as_vllm_does():
    body = _completion(
        response_format={"type": "json_schema", "json_schema": {"name": "n", "schema": {"type": "integer"}}}
    )
    (valid,) = parse_completion(body, TOKENIZER, LIMITS).prompts
    assert '"json_schema":{"type":"integer"' in valid.grammar
