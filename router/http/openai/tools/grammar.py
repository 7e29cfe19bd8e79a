"""The grammar of a tool-calling output: `special_tokens()`, the format's literals that are special
tokens of the vocabulary, and `tool_grammar()`, the llguidance Lark grammar of the calls (forced for
`required` or a named function, lazily triggered by the family's markers for `auto`)."""

import json
import re
from collections.abc import Callable, Iterable

from router.http import grammar
from router.http.openai.tools.formats import NAME_HEAD, CallFormat
from router.http.openai.tools.plan import ToolPlan, _tool_error


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
    """The llguidance grammar of the output (validated; see the package docstring)."""
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
