"""Parsing a tool-calling output: `CallStream`, the incremental scanner that splits a choice's text,
streamed or whole, into content and call deltas (`CallStart`, `ArgumentsDelta`), `parse()` for a
whole output, and the scanner's helpers."""

import json
import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass

from router.http.openai.tools.formats import CallFormat


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
