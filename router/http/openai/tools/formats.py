"""The call formats: how each model family writes tool calls (`CallFormat`), the families' formats
(Hermes/Qwen, Llama 3 JSON, Mistral), and `call_format()`, which picks a model's from its chat
template and tokenizer config."""

import json
from collections.abc import Iterable
from dataclasses import dataclass

NAME_HEAD = '{"name": "'  # every call object starts so


@dataclass(frozen=True, slots=True)
class CallFormat:
    """How one model family writes tool calls (see the package docstring)."""

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
