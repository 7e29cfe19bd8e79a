"""Tool calling on /v1/chat/completions: how each model family writes calls, and from that one
description the prompt, the grammar, and the parsing of the output, streamed or not.

A `CallFormat` describes a family's output as text:

    [opening] call_open {"name": NAME, "<args_key>": ARGUMENTS}call_close
              (separator call_open {...}call_close)* closing

- Hermes/Qwen (the default, also for templates without tool support):
  `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`, one block per call;
- Llama 3 JSON: `{"name": ..., "parameters": {...}}`, optionally after `<|python_tag|>`, calls
  separated by `; `;
- Mistral: `[TOOL_CALLS] [{"name": ..., "arguments": {...}}, ...]`.

Grammars (llguidance Lark; each tool's `parameters` inline as `%json {...}`; a format literal that
is a special token of the vocabulary is written as that token, `<[id]>`, so the model emits it as
it was trained to):
- `required` / a named function: the whole output is the section, from the first token: one call,
  or with `parallel_tool_calls` one or more (a named function: calls of that function only).
- `auto`: free text; each of the family's markers is a lazy trigger (or a special token) after
  which a call is constrained, so the model may answer in text or call (never forced into JSON).
  Without `parallel_tool_calls` the grammar ends after the first call.

Parsing (`CallStream`) is one incremental scanner used for both the streamed and the whole
output: text is content until a marker may be starting (a possible marker prefix is held back);
a call's id and name go out once its head `{"name": "...", "arguments":` is complete; the
arguments' text goes out as it arrives, its end found by tracking JSON nesting and strings. Only
whitespace separates calls: whitespace around calls is not content. Output that breaks the format
(cut by `max_tokens` or a stop sequence, or unconstrained text) is malformed: the whole text is
then the content, with no calls; a stream has already sent what it had.
"""

import contextlib
import json
import re
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from router.http import grammar
from router.http.errors import OpenAIError

NAME_HEAD = '{"name": "'  # every call object starts so


@dataclass(frozen=True, slots=True)
class CallFormat:
    """How one model family writes tool calls (see the module docstring)."""

    family: str
    opening: str  # before the first call of a section
    opening_optional: bool  # the section may start at the first call's `call_open`
    call_open: str  # before each call object
    call_close: str  # after each call object
    separator: str  # between calls of a section
    closing: str  # after the last call of a section
    args_keys: tuple[str, ...]  # the arguments' key: the first is written, any is read
    markers: tuple[str, ...]  # where a section may start in free text: `auto`'s triggers
    tokens: tuple[str, ...]  # literals that may be special tokens of the vocabulary

    def render(self, calls: Iterable[tuple[str, str]], quote_names: bool = True) -> str:
        """Calls `(name, arguments JSON text)` as this family writes them (without an optional opening)."""
        objects = [
            self.call_open
            + "{"
            + f'"name": {json.dumps(name) if quote_names else name}, "{self.args_keys[0]}": {arguments}'
            + "}"
            + self.call_close
            for name, arguments in calls
        ]
        return ("" if self.opening_optional else self.opening) + self.separator.join(objects) + self.closing


HERMES = CallFormat(
    family="hermes",
    opening="",
    opening_optional=False,
    call_open="<tool_call>\n",
    call_close="\n</tool_call>",
    separator="\n",
    closing="",
    args_keys=("arguments",),
    markers=("<tool_call>",),
    tokens=("<tool_call>", "</tool_call>"),
)
LLAMA3_JSON = CallFormat(
    family="llama3_json",
    opening="<|python_tag|>",
    opening_optional=True,
    call_open="",
    call_close="",
    separator="; ",
    closing="",
    args_keys=("parameters", "arguments"),
    markers=("<|python_tag|>", '{"name"'),
    tokens=("<|python_tag|>",),
)
MISTRAL = CallFormat(
    family="mistral",
    opening="[TOOL_CALLS] [",
    opening_optional=False,
    call_open="",
    call_close="",
    separator=", ",
    closing="]",
    args_keys=("arguments",),
    markers=("[TOOL_CALLS]",),
    tokens=("[TOOL_CALLS]",),
)
FORMATS = {f.family: f for f in (HERMES, LLAMA3_JSON, MISTRAL)}


def call_format(template: str | None, config: dict) -> CallFormat:
    """The family's format, from its chat template's text and its tokenizer's added tokens."""
    text = template or ""
    added = {t.get("content") for t in (config.get("added_tokens_decoder") or {}).values() if isinstance(t, dict)}
    if "<tool_call>" in text:  # Hermes and Qwen, whatever their base model
        return HERMES
    if "[TOOL_CALLS]" in text or "[TOOL_CALLS]" in added:
        return MISTRAL
    if "<|python_tag|>" in text or "<|start_header_id|>" in text or "<|python_tag|>" in added:
        return LLAMA3_JSON
    return HERMES


# ---------------------------------------------------------------------------------------------
# The request's tools


ANY_OBJECT = {"type": "object", "properties": {}}


@dataclass(frozen=True, slots=True)
class Function:
    """A tool of the request (its `function`)."""

    name: str
    description: str | None = None
    parameters: dict = field(default_factory=lambda: dict(ANY_OBJECT))
    strict: bool | None = None

    def openai(self) -> dict:
        """The tool as OpenAI writes it (what templates with tool support expect)."""
        function = {"name": self.name}
        if self.description is not None:
            function["description"] = self.description
        function["parameters"] = self.parameters
        if self.strict is not None:
            function["strict"] = self.strict
        return {"type": "function", "function": function}


@dataclass(frozen=True, slots=True)
class ToolPlan:
    """The tools in effect for a request (`tool_choice` not "none", some tools)."""

    format: CallFormat
    functions: tuple[Function, ...]  # those the output may call
    offered: tuple[Function, ...]  # those shown to the model
    forced: bool  # `required` or a named function: the output is calls only
    parallel: bool


def _tool_error(message: str) -> OpenAIError:
    return OpenAIError(f"Tool error: {message}", "tool_error")


def plan(
    functions: list[Function],
    choice: str | None,
    named: str | None,
    parallel: bool,
    fmt: CallFormat,
    response_format_constrained: bool,
) -> ToolPlan | None:
    """Check the tools against each other and `tool_choice` ("none", "auto", "required", or
    "function" with the function `named`); None when no tool may be called. Raises a `tool_error`."""
    names = [f.name for f in functions]
    for name in names:
        if names.count(name) > 1:
            raise _tool_error(f"two tools are named `{name}`")
    for f in functions:
        _check_parameters(f)
    if choice == "none" or (choice in (None, "auto") and not functions):
        return None
    if not functions:
        wanted = '"required"' if choice == "required" else f"(the function `{named}`)"
        raise _tool_error(f"`tool_choice` {wanted} needs `tools`")
    if response_format_constrained:
        raise _tool_error(
            "`response_format` cannot constrain the output while tools may be called: "
            'set `tool_choice` to "none", or `response_format` to `text`'
        )
    callable_ = functions
    if choice == "function":
        callable_ = [f for f in functions if f.name == named]
        if not callable_:
            raise _tool_error(f"`tool_choice` names the function `{named}`, which is not in `tools`")
    forced = choice in ("required", "function")
    return ToolPlan(fmt, tuple(callable_), tuple(functions), forced=forced, parallel=parallel)


def _check_parameters(f: Function) -> None:
    try:
        grammar.json_schema(f.parameters)
    except ValueError as e:
        raise _tool_error(f"the parameters of `{f.name}`: {e}") from None
    kind = f.parameters.get("type")
    if kind is not None and kind != "object":
        raise _tool_error(f"the parameters of `{f.name}` must describe a JSON object. Given type: {kind!r}")


# ---------------------------------------------------------------------------------------------
# Rendering


def prompt(tools: ToolPlan) -> str:
    """The system prompt for a template without tool support: the tools, and how to call them."""
    example = tools.format.render([("<function-name>", "<arguments-json-object>")], quote_names=False)
    if tools.forced and len(tools.functions) == 1:
        duty = f"You must call the function `{tools.functions[0].name}`."
    elif tools.forced:
        duty = "You must call at least one function." if tools.parallel else "You must call one function."
    else:
        duty = "You may call one or more functions" if tools.parallel else "You may call one function"
        duty += " to assist with the user query, or answer directly."
    return "\n".join(
        [
            "# Tools",
            "",
            duty,
            "",
            "The function signatures are within <tools></tools> XML tags:",
            "<tools>",
            *(json.dumps(f.openai(), ensure_ascii=False) for f in tools.offered),
            "</tools>",
            "",
            "To call a function, answer with the function name and arguments as a JSON object, exactly in this format:",
            example,
        ]
    )


def messages_for_template(
    messages: list[dict], tools: ToolPlan | None, fmt: CallFormat, template_has_tools: bool
) -> list[dict]:
    """The messages as the chat template sees them.

    A template with tool support gets them as they are, but for a call's `arguments`, given as
    JSON text by OpenAI clients, which it gets as an object (templates write it with `tojson`, as
    transformers and vLLM pass it). Otherwise tools are described in the first system message,
    an assistant's `tool_calls` are written into its content in the family's format, and `tool`
    results become user messages of `<tool_response>` blocks (consecutive ones in one message).
    """
    if template_has_tools:
        return [_decoded_arguments(m) for m in messages]
    out: list[dict] = []
    for i, m in enumerate(messages):
        if m["role"] == "tool":
            block = f"<tool_response>\n{m['content']}\n</tool_response>"
            if i and messages[i - 1]["role"] == "tool":
                out[-1]["content"] += "\n" + block
            else:
                out.append({"role": "user", "content": block})
        elif m.get("tool_calls"):
            calls = fmt.render(
                (c["function"]["name"], _arguments_text(c["function"]["arguments"])) for c in m["tool_calls"]
            )
            content = f"{m['content']}\n{calls}" if m["content"] else calls
            out.append({k: v for k, v in m.items() if k != "tool_calls"} | {"content": content})
        else:
            out.append(m)
    if tools is not None:
        if out[0]["role"] == "system":
            out[0] = {
                **out[0],
                "content": f"{out[0]['content']}\n\n{prompt(tools)}" if out[0]["content"] else prompt(tools),
            }
        else:
            out.insert(0, {"role": "system", "content": prompt(tools)})
    return out


def _arguments_text(arguments: str | dict) -> str:
    return arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)


def _decoded_arguments(message: dict) -> dict:
    if not message.get("tool_calls"):
        return message
    calls = []
    for call in message["tool_calls"]:
        arguments = call["function"]["arguments"]
        if isinstance(arguments, str):
            with contextlib.suppress(json.JSONDecodeError):  # not JSON: left as the client wrote it
                arguments = json.loads(arguments)
        calls.append({**call, "function": {**call["function"], "arguments": arguments}})
    return {**message, "tool_calls": calls}


# ---------------------------------------------------------------------------------------------
# Grammars


def special_tokens(fmt: CallFormat, encode: Callable[[str], list[int]], special_ids: Iterable[int]) -> dict[str, int]:
    """The format's literals that are one special token of the vocabulary, with their ids."""
    special_ids = frozenset(special_ids)
    out = {}
    for literal in fmt.tokens:
        ids = encode(literal)
        if len(ids) == 1 and ids[0] in special_ids:
            out[literal] = ids[0]
    return out


def _literal(text: str, specials: dict[str, int]) -> str:
    """Lark items for literal text, its special tokens as `<[id]>`."""
    parts = re.split(f"({'|'.join(map(re.escape, specials))})", text) if specials else [text]
    return " ".join(f"<[{specials[p]}]>" if p in specials else json.dumps(p) for p in parts if p)


def tool_grammar(tools: ToolPlan, specials: dict[str, int]) -> str:
    """The llguidance grammar of the output (validated; see the module docstring)."""
    fmt, lit = tools.format, (lambda text: _literal(text, specials))
    functions = [
        f"fn_{i}: {lit(f.name + chr(34) + ', ' + json.dumps(fmt.args_keys[0]) + ': ')} %json {_compact(f.parameters)}"
        for i, f in enumerate(tools.functions)
    ]
    rules = ["fns: " + " | ".join(f"fn_{i}" for i in range(len(functions))), *functions]
    # `more`: the further calls of a section, where there are any (required, or a list in auto)
    has_more = tools.parallel and (tools.forced or bool(fmt.closing))
    if tools.forced or has_more:
        rules.append(f"call: {lit(fmt.call_open + NAME_HEAD)} fns {lit('}' + fmt.call_close)}")
    if has_more:
        rules.append(f"more: ({lit(fmt.separator)} call)*")
    more = "more" if has_more else ""
    if tools.forced:
        opening = lit(fmt.opening)
        if opening and fmt.opening_optional:
            opening = f"({opening})?"
        start = [f"start: {opening} call {more} {lit(fmt.closing)}"]
    else:
        start = [*_lazy_sections(tools, specials, lit, more), "TEXT: /(.|\\n)*/"]
    source = "\n".join(["%llguidance {}", *start, *rules, ""])
    try:
        return grammar.lark(source)
    except ValueError as e:
        raise _tool_error(str(e)) from None


def _compact(schema: dict) -> str:
    """`schema` for an inline %json, without free whitespace unless the schema asks for it."""
    return json.dumps({"x-guidance": grammar.JSON_OPTIONS, **schema})


def _lazy_sections(tools: ToolPlan, specials: dict[str, int], lit: Callable[[str], str], more: str) -> list[str]:
    """`auto`: free text, and after each marker the rest of a section (a whole list where the
    format closes its calls with `closing`, one call otherwise: further calls start afresh)."""
    fmt = tools.format
    starts = [fmt.opening + fmt.call_open + NAME_HEAD]
    if fmt.opening_optional:
        starts.append(fmt.call_open + NAME_HEAD)
    rules, sections = [], []
    for k, marker in enumerate(fmt.markers):
        rest = next(s[len(marker) :] for s in starts if s.startswith(marker))
        body = f"{lit(rest)} fns {lit('}' + fmt.call_close)} {more} {lit(fmt.closing)}"
        if marker in specials:
            rules.append(f"sec_{k}: TEXT <[{specials[marker]}]> {body}")
        else:  # a lazy lexeme: the text ends at the marker's first occurrence
            rules += [f"sec_{k}_trig[lazy]: TEXT {json.dumps(marker)}", f"sec_{k}: sec_{k}_trig {body}"]
        sections.append(f"sec_{k}")
    alternatives = " | ".join(sections)
    start = f"start: ({alternatives})* TEXT" if tools.parallel else f"start: TEXT | {alternatives}"
    return [start, *rules]


# ---------------------------------------------------------------------------------------------
# Parsing


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


@dataclass(frozen=True, slots=True)
class CallStart:
    """A call's first delta: its index in the choice, id and name."""

    index: int
    id: str
    name: str


@dataclass(frozen=True, slots=True)
class ArgumentsDelta:
    """The next fragment of call `index`'s arguments."""

    index: int
    text: str


Piece = str | CallStart | ArgumentsDelta  # content text, or a call's delta


@dataclass(slots=True)
class ParsedCall:
    id: str
    name: str
    arguments: str  # JSON text of an object, as generated


_MORE, _FAIL = -1, -2  # a match needs more text / cannot match
_LITERAL_TOKENS = re.compile(r'\s+|"(?:[^"\\]|\\.)*"|<[^<>\s]*>|\[[A-Z_]+\]|\S')
_TEXT, _SECTION, _ARGS, _TAIL, _AFTER = "text", "section", "args", "tail", "after"


class CallStream:
    """Splits one choice's text, fed in pieces of any size, into content and tool-call deltas.

    `feed()` returns what may be sent after each piece; `finish()` what is left at the end. The
    concatenation of the content pieces, and each call's arguments fragments, do not depend on
    how the text was split. JSON whitespace is allowed between the format's literals.
    """

    def __init__(self, fmt: CallFormat, new_id: Callable[[], str] = new_call_id):
        self.fmt, self.new_id = fmt, new_id
        self.calls: list[ParsedCall] = []
        self.malformed = False
        self._state = _TEXT
        self._buf = ""  # text not handled yet; in a section before its first head, from its marker
        self._marker_len = 0
        self._pending_ws = ""  # trailing whitespace of the content: sent once more content follows
        self._depth = 0  # inside the arguments: nesting, and whether in a string / after a backslash
        self._in_string = self._escaped = False
        self._out: list[Piece] = []

    def feed(self, text: str) -> list[Piece]:
        self._buf += text
        while self._step(final=False):
            pass
        return self._flush()

    def finish(self) -> list[Piece]:
        while self._step(final=True):
            pass
        if self._state == _ARGS:  # a call cut short
            self.malformed = True
        if not self.calls and self._pending_ws:
            self._out.append(self._pending_ws)
        self._pending_ws = ""
        return self._flush()

    # -- the states; each returns whether it made progress

    def _step(self, final: bool) -> bool:
        return getattr(self, f"_{self._state}")(final)

    def _text(self, final: bool) -> bool:
        found = [(at, m) for m in self.fmt.markers if (at := self._buf.find(m)) >= 0]
        if found:
            at, marker = min(found)
            self._content(self._buf[:at])
            self._buf, self._marker_len, self._state = self._buf[at:], len(marker), _SECTION
            return True
        keep = 0 if final else _held_back(self._buf, self.fmt.markers)
        self._content(self._buf[: len(self._buf) - keep])
        self._buf = self._buf[len(self._buf) - keep :]
        return False

    def _section(self, final: bool) -> bool:
        fmt = self.fmt
        prefixes = [fmt.opening + fmt.call_open] + ([fmt.call_open] if fmt.opening_optional else [])
        results = [self._head(p) for p in prefixes]
        if any(r not in (_MORE, _FAIL) for r in results):
            return self._start_call(next(r for r in results if r not in (_MORE, _FAIL)))
        if _MORE in results and not final:
            return False
        self.malformed = True  # the marker is content after all
        self._content(self._buf[: self._marker_len])
        self._buf, self._state = self._buf[self._marker_len :], _TEXT
        return True

    def _args(self, final: bool) -> bool:
        i = 0
        while i < len(self._buf) and self._depth:
            c = self._buf[i]
            if self._escaped:
                self._escaped = False
            elif self._in_string:
                self._escaped, self._in_string = c == "\\", c != '"'
            elif c == '"':
                self._in_string = True
            elif c in "{[":
                self._depth += 1
            elif c in "}]":
                self._depth -= 1
            i += 1
        if i == 0:
            return False
        fragment, self._buf = self._buf[:i], self._buf[i:]
        call = self.calls[-1]
        call.arguments += fragment
        self._out.append(ArgumentsDelta(len(self.calls) - 1, fragment))
        if not self._depth:
            self._state = _TAIL if _is_object(call.arguments) else self._broken()
        return True

    def _tail(self, final: bool) -> bool:
        end = _match(self._buf, 0, "}" + self.fmt.call_close)
        if end == _MORE and not final:
            return False
        if end < 0:
            self._state = self._broken()
            return True
        self._buf, self._state = self._buf[end:], _AFTER
        return True

    def _after(self, final: bool) -> bool:
        fmt = self.fmt
        head = self._head(fmt.separator + fmt.call_open)
        if head not in (_MORE, _FAIL):
            return self._start_call(head)
        closing = _match(self._buf, 0, fmt.closing) if fmt.closing else 0
        if head == _MORE and not final or closing == _MORE and not final:
            return False
        if closing >= 0:
            self._buf, self._state = self._buf[closing:], _TEXT
        else:
            self._state = self._broken()
        return True

    # -- helpers

    def _head(self, prefix: str) -> tuple[int, str] | int:
        """Match `prefix` then `{"name": "<name>", "<args key>": ` and the arguments' `{`:
        (where the arguments start, the name), or _MORE / _FAIL."""
        buf = self._buf
        i = _match(buf, 0, prefix + '{"name":')
        if i < 0:
            return i
        i = _skip_ws(buf, i)
        if i == len(buf):
            return _MORE
        if buf[i] != '"':
            return _FAIL
        end = _string_end(buf, i)
        if end < 0:
            return end
        try:
            name = json.loads(buf[i:end])
        except json.JSONDecodeError:
            return _FAIL
        keys = [_match(buf, end, f', "{key}":') for key in self.fmt.args_keys]
        i = max(keys)
        if i < 0:
            return _MORE if _MORE in keys else _FAIL
        i = _skip_ws(buf, i)
        if i == len(buf):
            return _MORE
        return (i, name) if buf[i] == "{" else _FAIL

    def _start_call(self, head: tuple[int, str]) -> bool:
        at, name = head
        self._pending_ws = ""  # whitespace before a call is not content
        self.calls.append(ParsedCall(self.new_id(), name, ""))
        self._out += [CallStart(len(self.calls) - 1, self.calls[-1].id, name)]
        self._buf, self._state = self._buf[at:], _ARGS
        self._depth, self._in_string, self._escaped = 1, False, False
        self._buf = self._buf[1:]
        self.calls[-1].arguments = "{"
        self._out.append(ArgumentsDelta(len(self.calls) - 1, "{"))
        return True

    def _broken(self) -> str:
        """The output breaks the format after a call started: the rest is text."""
        self.malformed = True
        return _TEXT

    def _content(self, text: str) -> None:
        if not text:
            return
        text = self._pending_ws + text
        body = text.rstrip()
        self._pending_ws = text[len(body) :]
        if body:
            self._out.append(body)

    def _flush(self) -> list[Piece]:
        """The pieces since the last call, adjacent content and arguments of one call merged."""
        merged: list[Piece] = []
        for piece in self._out:
            last = merged[-1] if merged else None
            if isinstance(piece, str) and isinstance(last, str):
                merged[-1] = last + piece
            elif isinstance(piece, ArgumentsDelta) and isinstance(last, ArgumentsDelta) and last.index == piece.index:
                merged[-1] = ArgumentsDelta(piece.index, last.text + piece.text)
            else:
                merged.append(piece)
        self._out = []
        return merged


def _held_back(text: str, markers: tuple[str, ...]) -> int:
    """The length of the longest end of `text` that may begin a marker."""
    for n in range(min(len(text), max(map(len, markers)) - 1), 0, -1):
        if any(m.startswith(text[-n:]) for m in markers):
            return n
    return 0


def _skip_ws(text: str, i: int) -> int:
    while i < len(text) and text[i].isspace():
        i += 1
    return i


def _match(text: str, i: int, literal: str) -> int:
    """Match `literal` at `text[i:]`, allowing any whitespace between its tokens: the end, _MORE or _FAIL."""
    for token in _LITERAL_TOKENS.findall(literal):
        if token.isspace():
            continue
        i = _skip_ws(text, i)
        available = text[i : i + len(token)]
        if not token.startswith(available):
            return _FAIL
        if len(available) < len(token):
            return _MORE
        i += len(token)
    return i


def _string_end(text: str, i: int) -> int:
    """The end of the JSON string starting at `text[i]` (a quote), or _MORE."""
    j = i + 1
    while j < len(text):
        if text[j] == "\\":
            j += 2
        elif text[j] == '"':
            return j + 1
        else:
            j += 1
    return _MORE


def _is_object(text: str) -> bool:
    try:
        return isinstance(json.loads(text), dict)
    except json.JSONDecodeError:
        return False


def parse(fmt: CallFormat, text: str, new_id: Callable[[], str] = new_call_id) -> tuple[str | None, list[ParsedCall]]:
    """A whole output -> (content, calls): content is null when only calls were made, and the
    whole text when the output breaks the format."""
    stream = CallStream(fmt, new_id)
    pieces = stream.feed(text) + stream.finish()
    if stream.malformed or not stream.calls:
        return text, []
    return "".join(p for p in pieces if isinstance(p, str)) or None, stream.calls
