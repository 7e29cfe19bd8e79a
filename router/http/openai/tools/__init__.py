"""Tool calling on /v1/chat/completions: how each model family writes calls, and from that one
description the prompt, the grammar, and the parsing of the output, streamed or not.

A `CallFormat` (formats.py) describes a family's output as text:

    [opening] call_open {"name": NAME, "<args_key>": ARGUMENTS}call_close
              (separator call_open {...}call_close)* closing

- Hermes/Qwen (the default, also for templates without tool support):
  `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`, one block per call;
- Llama 3 JSON: `{"name": ..., "parameters": {...}}`, optionally after `<|python_tag|>`, calls
  separated by `; `;
- Mistral: `[TOOL_CALLS] [{"name": ..., "arguments": {...}}, ...]`.

The request's tools are checked against `tool_choice` into a `ToolPlan`, and described to a
template without tool support in the system prompt (plan.py).

Grammars (grammar.py; llguidance Lark; each tool's `parameters` inline as `%json {...}`; a format
literal that is a special token of the vocabulary is written as that token, `<[id]>`, so the model
emits it as it was trained to):
- `required` / a named function: the whole output is the section, from the first token: one call,
  or with `parallel_tool_calls` one or more (a named function: calls of that function only).
- `auto`: free text; each of the family's markers is a lazy trigger (or a special token) after
  which a call is constrained, so the model may answer in text or call (never forced into JSON).
  Without `parallel_tool_calls` the grammar ends after the first call.

Parsing (parse.py, `CallStream`) is one incremental scanner used for both the streamed and the
whole output: text is content until a marker may be starting (a possible marker prefix is held
back); a call's id and name go out once its head `{"name": "...", "arguments":` is complete; the
arguments' text goes out as it arrives, its end found by tracking JSON nesting and strings. Only
whitespace separates calls: whitespace around calls is not content. Output that breaks the format
(cut by `max_tokens` or a stop sequence, or unconstrained text) is malformed: the whole text is
then the content, with no calls; a stream has already sent what it had.
"""

from router.http.openai.tools.formats import HERMES, LLAMA3_JSON, MISTRAL, CallFormat, call_format
from router.http.openai.tools.grammar import special_tokens, tool_grammar
from router.http.openai.tools.parse import ArgumentsDelta, CallStart, CallStream, Piece, parse
from router.http.openai.tools.plan import ANY_OBJECT, Function, ToolPlan, messages_for_template, plan

__all__ = [
    "ANY_OBJECT",
    "HERMES",
    "LLAMA3_JSON",
    "MISTRAL",
    "ArgumentsDelta",
    "CallFormat",
    "CallStart",
    "CallStream",
    "Function",
    "Piece",
    "ToolPlan",
    "call_format",
    "messages_for_template",
    "parse",
    "plan",
    "special_tokens",
    "tool_grammar",
]
