"""Tool calling on /v1/chat/completions without a server: the format chosen per model family, the
rendering with and without template support, the grammars of each mode and format checked by
llguidance's own matcher over a byte-level tokenizer, the parsing of outputs, and streams whose
deltas reassemble to exactly the non-streamed calls however the text is split."""

import json
import random
from pathlib import Path

import pytest
from llguidance import LLMatcher, LLTokenizer
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers

from router.core.engine import Token, TokenEvent
from router.http.errors import ApiError
from router.http.openai import responses as oai
from router.http.openai import tools
from router.http.openai.plan import Plan, parse_chat
from router.http.openai.routes import _ChatChunks
from router.tokenizer import Tokenizer
from tests.router.stand_ins import LIMITS, ByteTokenizer

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "unit": {"enum": ["c", "f"]}},
            "required": ["city"],
            "additionalProperties": False,
        },
    },
}
NOW = {"type": "function", "function": {"name": "now"}}
TOOLS = [WEATHER, NOW]
USER = [{"role": "user", "content": "Weather in Paris?"}]

# Chat templates, one per family (with tool support) and one without.
HERMES_TEMPLATE = (
    "{% if tools %}<|im_start|>system\n<tools>{% for t in tools %}{{ t | tojson }}{% endfor %}</tools>"
    "<tool_call>...</tool_call><|im_end|>\n{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}"
    "{% for c in m.tool_calls or [] %}<tool_call>\n{{ c.function | tojson }}\n</tool_call>{% endfor %}"
    "{% if m.tool_call_id %}[{{ m.tool_call_id }}]{% endif %}<|im_end|>\n{% endfor %}<|im_start|>assistant\n"
)
LLAMA3_TEMPLATE = (
    "{% for m in messages %}<|start_header_id|>{{ m.role }}<|end_header_id|>\n\n{{ m.content }}<|eot_id|>{% endfor %}"
    "{% if tools %}{{ tools | length }} tools{% endif %}<|start_header_id|>assistant<|end_header_id|>\n\n"
)
MISTRAL_TEMPLATE = (
    "{% if tools %}[AVAILABLE_TOOLS]{{ tools | tojson }}[/AVAILABLE_TOOLS]{% endif %}"
    "{% for m in messages %}[INST]{{ m.content }}[/INST]{% endfor %}"
    "{# a call is written [TOOL_CALLS] [...] #}"
)
PLAIN_TEMPLATE = "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}\n{% endfor %}<|assistant|>"
TEMPLATES = {"hermes": HERMES_TEMPLATE, "llama3_json": LLAMA3_TEMPLATE, "mistral": MISTRAL_TEMPLATE}
FORMATS = [tools.HERMES, tools.LLAMA3_JSON, tools.MISTRAL]
MARKERS = ["<tool_call>", "</tool_call>", "[TOOL_CALLS]", "<|python_tag|>"]


# ---------------------------------------------------------------------------------------------
# A byte-level tokenizer, for the router and for llguidance


def _byte_level(path, specials: list[str]) -> None:
    """One token per byte (ids 0-255), then `specials`; the first special is EOS."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = HFTokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(specials)
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({"eos_token": specials[0]}))


class Vocab:
    """The router's tokenizer and llguidance's over the same vocabulary."""

    def __init__(self, path, specials: list[str]):
        _byte_level(path, specials)
        self.router = Tokenizer(path)
        self.llg = LLTokenizer(str(path / "tokenizer.json"), eos_token=256)

    def with_template(self, template: str) -> Tokenizer:
        self.router.config = {**self.router.config, "chat_template": template}
        return self.router

    def accepts(self, grammar: str, text: str) -> bool:
        """Whether the grammar lets a model generate `text` and then EOS."""
        matcher = LLMatcher(self.llg, grammar, log_level=0)
        assert not matcher.is_error(), matcher.get_error()
        ok = matcher.consume_tokens(self.llg.tokenize_str(text, parse_special=True))
        return ok and not matcher.is_error() and matcher.is_accepting()

    def completes(self, grammar: str, text: str) -> bool:
        """Whether the grammar accepts nothing more after `text` (the request then ends)."""
        matcher = LLMatcher(self.llg, grammar, log_level=0)
        matcher.consume_tokens(self.llg.tokenize_str(text, parse_special=True))
        return matcher.is_stopped() and not matcher.is_error()


@pytest.fixture(scope="module", params=["text markers", "special markers"])
def vocab(request, tmp_path_factory) -> Vocab:
    """Markers as plain text (lazy triggers), or as special tokens of the vocabulary (`<[id]>`)."""
    specials = ["<|eot|>"] + (MARKERS if request.param == "special markers" else [])
    return Vocab(tmp_path_factory.mktemp(request.param.replace(" ", "-")), specials)


def _grammar(vocab: Vocab, family: str, **fields) -> str:
    tokenizer = vocab.with_template(TEMPLATES[family])
    (valid,) = parse_chat({"messages": USER, "tools": TOOLS, **fields}, tokenizer, LIMITS).prompts
    return valid.grammar


def _call(fmt: tools.CallFormat, *calls: tuple[str, dict]) -> str:
    return fmt.render((name, json.dumps(arguments)) for name, arguments in calls)


PARIS = ("get_weather", {"city": "Paris", "unit": "c"})
ROME = ("get_weather", {"city": "Rome"})
CLOCK = ("now", {})


# ---------------------------------------------------------------------------------------------
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
    assert _call(fmt, CLOCK) == text


def test_several_calls_are_written_with_the_separator():
    assert _call(tools.MISTRAL, CLOCK, CLOCK) == '[TOOL_CALLS] [{"name": "now", "arguments": {}}, ' + (
        '{"name": "now", "arguments": {}}]'
    )
    assert _call(tools.LLAMA3_JSON, CLOCK, CLOCK).count("; ") == 1
    assert _call(tools.HERMES, CLOCK, CLOCK).count("</tool_call>\n<tool_call>") == 1


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
# Grammars, checked by llguidance's matcher


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.family)
def test_auto_is_free_text_with_calls_constrained_after_the_marker(vocab, fmt):
    grammar = _grammar(vocab, fmt.family)
    assert vocab.accepts(grammar, "The weather is nice.")
    assert vocab.accepts(grammar, '{"city": "Paris"} is JSON, but not a call')  # never forced into JSON
    assert vocab.accepts(grammar, "")
    assert vocab.accepts(grammar, _call(fmt, PARIS))
    assert vocab.accepts(grammar, "Let me check. " + _call(fmt, PARIS, CLOCK) + " Done.")
    assert vocab.accepts(grammar, _call(fmt, PARIS) + "\n" + _call(fmt, ROME))  # parallel calls
    assert not vocab.accepts(grammar, _call(fmt, ("get_weather", {"town": "Paris"})))  # against the schema
    assert not vocab.accepts(grammar, _call(fmt, ("get_time", {})))  # no such tool
    marker = fmt.markers[-1]
    assert not vocab.accepts(grammar, f"Hi {marker} and then prose")  # the marker starts a call


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.family)
def test_auto_without_parallel_calls_ends_after_one_call(vocab, fmt):
    grammar = _grammar(vocab, fmt.family, parallel_tool_calls=False)
    assert vocab.accepts(grammar, "No call needed.")
    assert vocab.accepts(grammar, "Checking. " + _call(fmt, PARIS))
    assert vocab.completes(grammar, "Checking. " + _call(fmt, PARIS))
    assert not vocab.accepts(grammar, _call(fmt, PARIS, ROME))
    assert not vocab.accepts(grammar, _call(fmt, PARIS) + " more text")


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.family)
def test_required_constrains_from_the_first_token(vocab, fmt):
    grammar = _grammar(vocab, fmt.family, tool_choice="required")
    assert vocab.accepts(grammar, _call(fmt, PARIS))
    assert vocab.accepts(grammar, _call(fmt, PARIS, CLOCK, ROME))
    assert not vocab.accepts(grammar, "The weather is nice.")
    assert not vocab.accepts(grammar, "")
    assert not vocab.accepts(grammar, "Sure: " + _call(fmt, PARIS))
    assert not vocab.accepts(grammar, _call(fmt, PARIS) + " Done.")
    assert not vocab.accepts(grammar, _call(fmt, ("get_weather", {"city": 5})))
    assert not vocab.accepts(grammar, _call(fmt, ("get_weather", {"city": "Paris", "extra": 1})))


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.family)
def test_required_without_parallel_calls_is_one_call(vocab, fmt):
    grammar = _grammar(vocab, fmt.family, tool_choice="required", parallel_tool_calls=False)
    assert vocab.accepts(grammar, _call(fmt, CLOCK))
    assert vocab.completes(grammar, _call(fmt, CLOCK))
    assert not vocab.accepts(grammar, _call(fmt, CLOCK, CLOCK))


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.family)
def test_a_named_function_is_the_only_one_callable(vocab, fmt):
    named = {"type": "function", "function": {"name": "get_weather"}}
    grammar = _grammar(vocab, fmt.family, tool_choice=named)
    assert vocab.accepts(grammar, _call(fmt, ROME))
    assert vocab.accepts(grammar, _call(fmt, ROME, PARIS))
    assert not vocab.accepts(grammar, _call(fmt, CLOCK))
    assert not vocab.accepts(grammar, "Rome is sunny.")


def test_llama3_calls_may_follow_the_python_tag(vocab):
    call = _call(tools.LLAMA3_JSON, PARIS)
    assert vocab.accepts(_grammar(vocab, "llama3_json", tool_choice="required"), "<|python_tag|>" + call)
    assert vocab.accepts(_grammar(vocab, "llama3_json"), "Checking. <|python_tag|>" + call)


def test_special_markers_are_the_vocabularys_tokens(tmp_path):
    vocab = Vocab(tmp_path, ["<|eot|>"] + MARKERS)
    grammar = _grammar(vocab, "mistral", tool_choice="required")
    (marker_id,) = vocab.router.encode("[TOOL_CALLS]", add_special_tokens=False)
    assert f"<[{marker_id}]>" in grammar and '"[TOOL_CALLS]' not in grammar
    # the model must emit the special token: the marker spelled out byte by byte is refused
    spelled = [i for c in "[TOOL_CALLS]" for i in vocab.router.encode(c, add_special_tokens=False)]
    assert len(spelled) == len("[TOOL_CALLS]")
    matcher = LLMatcher(vocab.llg, grammar, log_level=0)
    assert not matcher.consume_tokens(spelled)


BUNDLED = Path(__file__).resolve().parents[2] / "models" / "SmolLM2-135M-Instruct"


@pytest.mark.skipif(not (BUNDLED / "tokenizer.json").exists(), reason="the bundled model is missing: `make model`")
def test_the_bundled_models_grammars_over_its_own_tokens():
    """SmolLM2's template has no tools: Hermes calls, described in the system prompt, over BPE tokens
    that may merge text with the marker's first bytes."""
    tokenizer = Tokenizer(BUNDLED)
    llg = LLTokenizer(str(BUNDLED / "tokenizer.json"))

    def accepts(grammar: str, text: str) -> bool:
        matcher = LLMatcher(llg, grammar, log_level=0)
        return matcher.consume_tokens(tokenizer.encode(text, add_special_tokens=False)) and matcher.is_accepting()

    def grammar(**fields) -> str:
        plan = parse_chat({"messages": USER, "tools": TOOLS, **fields}, tokenizer, LIMITS)
        assert "# Tools" in plan.prompts[0].inputs and plan.tool_format is tools.HERMES
        return plan.prompts[0].grammar

    auto, required = grammar(), grammar(tool_choice="required")
    assert accepts(auto, "It is sunny in Paris.") and not accepts(required, "It is sunny in Paris.")
    for text in ("Let me look:<tool_call>", "Sure!\n\n<tool_call>", "<tool_call>"):
        call = text + _call(tools.HERMES, PARIS).removeprefix("<tool_call>")
        assert accepts(auto, call), text
    assert accepts(required, _call(tools.HERMES, PARIS, ROME))
    assert not accepts(auto, 'Sure:<tool_call>\n{"name": "get_weather", "arguments": {"town": 1}}')


def test_tools_given_with_no_template_support_are_constrained_too(vocab):
    tokenizer = vocab.with_template(PLAIN_TEMPLATE)
    (valid,) = parse_chat({"messages": USER, "tools": TOOLS, "tool_choice": "required"}, tokenizer, LIMITS).prompts
    assert vocab.accepts(valid.grammar, _call(tools.HERMES, PARIS))
    assert not vocab.accepts(valid.grammar, "Paris is sunny.")


def test_no_constraint_without_tools_or_with_tool_choice_none():
    for body in ({}, {"tools": TOOLS, "tool_choice": "none"}, {"tool_choice": "auto"}):
        plan = parse_chat({"messages": USER, **body}, ByteTokenizer(), LIMITS)
        assert plan.prompts[0].grammar == "" and plan.tool_format is None
    body = {"messages": USER, "tools": TOOLS, "tool_choice": "none", "response_format": {"type": "json_object"}}
    plan = parse_chat(body, ByteTokenizer(), LIMITS)
    assert "json_schema" in plan.prompts[0].grammar  # response_format alone


def test_strict_tools_are_accepted_and_constrained(vocab):
    strict = {"type": "function", "function": {**WEATHER["function"], "strict": True}}
    tokenizer = vocab.with_template(HERMES_TEMPLATE)
    (valid,) = parse_chat({"messages": USER, "tools": [strict]}, tokenizer, LIMITS).prompts
    assert not vocab.accepts(valid.grammar, _call(tools.HERMES, ("get_weather", {"city": 1})))


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
    assert _parse(fmt, _call(fmt, PARIS)) == (None, [PARIS])
    assert _parse(fmt, _call(fmt, PARIS, CLOCK, ROME)) == (None, [PARIS, CLOCK, ROME])
    assert _parse(fmt, "Let me check.\n" + _call(fmt, PARIS) + "\nOne moment.") == (
        "Let me check.\nOne moment.",
        [PARIS],
    )
    assert _parse(fmt, "  " + _call(fmt, CLOCK) + "\n\n") == (None, [CLOCK])
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
    text = "Hi " + broken(_call(fmt, PARIS))
    assert _parse(fmt, text) == (text, [])
    assert _parse(fmt, _call(fmt, CLOCK) + " then " + broken(_call(fmt, PARIS))) == (
        _call(fmt, CLOCK) + " then " + broken(_call(fmt, PARIS)),
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
    lambda fmt: _call(fmt, PARIS),
    lambda fmt: "Let me check the weather for you.\n" + _call(fmt, PARIS, CLOCK) + "\nDone!",
    lambda fmt: _call(fmt, ("f", {"q": 'a}b"{\\', "deep": [[{"x": "]"}]], "emoji": "🌊"})),
    lambda fmt: "A brace { and a tag < and [ bracket, no call.",
    lambda fmt: _call(fmt, PARIS) + "\n\n" + _call(fmt, ROME),
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
    call = _call(fmt, PARIS)
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
    marker, calls = fmt.markers[0], _call(fmt, PARIS, CLOCK)
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
    events = _events(list(_call(tools.HERMES, CLOCK)))
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
    text = _call(tools.HERMES, PARIS)[:40]
    plan = _chat_plan(PLAIN_TEMPLATE)
    events = _events(list(text), reason="length")
    (choice,) = oai.ChatCompletion.of(plan, oai.envelope("chat", "m"), [events]).choices
    assert (choice.message.content, choice.message.tool_calls, choice.finish_reason) == (text, None, "length")
    assert _from_chunks(_chunks(plan, events))[2] == "length"


def test_stop_sequences_are_cut_before_calls_are_parsed():
    plan = _chat_plan(PLAIN_TEMPLATE, stop=["STOP"])
    text = _call(tools.HERMES, CLOCK) + "\nSTOP"  # the token completing the stop sequence ends the request
    events = [TokenEvent(Token(i, c, -0.5, False), []) for i, c in enumerate(text)]
    events[-1] = TokenEvent(events[-1].token, [], "stop_sequence", text)
    (choice,) = oai.ChatCompletion.of(plan, oai.envelope("chat", "m"), [events]).choices
    assert choice.message.content is None and choice.message.tool_calls[0].function.name == "now"
    content, calls, reason = _from_chunks(_chunks(plan, events))
    assert (content, len(calls), reason) == (None, 1, "tool_calls")


def test_each_chunk_carries_one_delta_and_the_token_logprobs_once():
    plan = _chat_plan(PLAIN_TEMPLATE, logprobs=True)
    text = _call(tools.HERMES, CLOCK)
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
