"""Tool-calling grammars of each mode and format, checked by llguidance's own matcher over a
byte-level tokenizer (markers as text or as special tokens) and over the bundled model's."""

import json
from pathlib import Path

import pytest
from llguidance import LLMatcher, LLTokenizer
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers

from router.http.openai import tools
from router.http.openai.plan import parse_chat
from router.tokenizer import Tokenizer
from tests.router.stand_ins import LIMITS, ByteTokenizer
from tests.router.tool_cases import (
    CLOCK,
    FORMATS,
    HERMES_TEMPLATE,
    MARKERS,
    PARIS,
    PLAIN_TEMPLATE,
    ROME,
    TEMPLATES,
    TOOLS,
    USER,
    WEATHER,
    call_text,
)

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


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.family)
def test_auto_is_free_text_with_calls_constrained_after_the_marker(vocab, fmt):
    grammar = _grammar(vocab, fmt.family)
    assert vocab.accepts(grammar, "The weather is nice.")
    assert vocab.accepts(grammar, '{"city": "Paris"} is JSON, but not a call')  # never forced into JSON
    assert vocab.accepts(grammar, "")
    assert vocab.accepts(grammar, call_text(fmt, PARIS))
    assert vocab.accepts(grammar, "Let me check. " + call_text(fmt, PARIS, CLOCK) + " Done.")
    assert vocab.accepts(grammar, call_text(fmt, PARIS) + "\n" + call_text(fmt, ROME))  # parallel calls
    assert not vocab.accepts(grammar, call_text(fmt, ("get_weather", {"town": "Paris"})))  # against the schema
    assert not vocab.accepts(grammar, call_text(fmt, ("get_time", {})))  # no such tool
    marker = fmt.markers[-1]
    assert not vocab.accepts(grammar, f"Hi {marker} and then prose")  # the marker starts a call


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.family)
def test_auto_without_parallel_calls_ends_after_onecall_text(vocab, fmt):
    grammar = _grammar(vocab, fmt.family, parallel_tool_calls=False)
    assert vocab.accepts(grammar, "No call needed.")
    assert vocab.accepts(grammar, "Checking. " + call_text(fmt, PARIS))
    assert vocab.completes(grammar, "Checking. " + call_text(fmt, PARIS))
    assert not vocab.accepts(grammar, call_text(fmt, PARIS, ROME))
    assert not vocab.accepts(grammar, call_text(fmt, PARIS) + " more text")


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.family)
def test_required_constrains_from_the_first_token(vocab, fmt):
    grammar = _grammar(vocab, fmt.family, tool_choice="required")
    assert vocab.accepts(grammar, call_text(fmt, PARIS))
    assert vocab.accepts(grammar, call_text(fmt, PARIS, CLOCK, ROME))
    assert not vocab.accepts(grammar, "The weather is nice.")
    assert not vocab.accepts(grammar, "")
    assert not vocab.accepts(grammar, "Sure: " + call_text(fmt, PARIS))
    assert not vocab.accepts(grammar, call_text(fmt, PARIS) + " Done.")
    assert not vocab.accepts(grammar, call_text(fmt, ("get_weather", {"city": 5})))
    assert not vocab.accepts(grammar, call_text(fmt, ("get_weather", {"city": "Paris", "extra": 1})))


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.family)
def test_required_without_parallel_calls_is_onecall_text(vocab, fmt):
    grammar = _grammar(vocab, fmt.family, tool_choice="required", parallel_tool_calls=False)
    assert vocab.accepts(grammar, call_text(fmt, CLOCK))
    assert vocab.completes(grammar, call_text(fmt, CLOCK))
    assert not vocab.accepts(grammar, call_text(fmt, CLOCK, CLOCK))


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.family)
def test_a_named_function_is_the_only_one_callable(vocab, fmt):
    named = {"type": "function", "function": {"name": "get_weather"}}
    grammar = _grammar(vocab, fmt.family, tool_choice=named)
    assert vocab.accepts(grammar, call_text(fmt, ROME))
    assert vocab.accepts(grammar, call_text(fmt, ROME, PARIS))
    assert not vocab.accepts(grammar, call_text(fmt, CLOCK))
    assert not vocab.accepts(grammar, "Rome is sunny.")


def test_llama3_calls_may_follow_the_python_tag(vocab):
    call = call_text(tools.LLAMA3_JSON, PARIS)
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
        call = text + call_text(tools.HERMES, PARIS).removeprefix("<tool_call>")
        assert accepts(auto, call), text
    assert accepts(required, call_text(tools.HERMES, PARIS, ROME))
    assert not accepts(auto, 'Sure:<tool_call>\n{"name": "get_weather", "arguments": {"town": 1}}')


def test_tools_given_with_no_template_support_are_constrained_too(vocab):
    tokenizer = vocab.with_template(PLAIN_TEMPLATE)
    (valid,) = parse_chat({"messages": USER, "tools": TOOLS, "tool_choice": "required"}, tokenizer, LIMITS).prompts
    assert vocab.accepts(valid.grammar, call_text(tools.HERMES, PARIS))
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
    assert not vocab.accepts(valid.grammar, call_text(tools.HERMES, ("get_weather", {"city": 1})))
