"""Output constraints as llguidance grammars, checked before a request is queued.

Every constraint a request can carry (TGI's `grammar`, OpenAI's `response_format`, tool calls)
becomes one llguidance grammar: its JSON TopLevelGrammar, which the shards compile against the
model's tokenizer. llguidance validates a grammar without the tokenizer, so a bad schema or
regex is a 422 here, never a failure in a shard.
"""

import functools
import json

from llguidance import LLMatcher, StructTag

JSON_OBJECT_SCHEMA = {"type": "object"}
# JSON spaced as Python's json.dumps writes it ({"a": 1, "b": [2, 3]}), the way models most often saw
# it; free whitespace would let a small model emit spaces or newlines until max_tokens.
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


@functools.lru_cache(maxsize=256)
def _checked(grammar: str) -> str:
    """`grammar` if llguidance accepts it; ValueError with llguidance's reason otherwise."""
    error = LLMatcher.validate_grammar(grammar)
    if error:
        raise ValueError(error.strip())
    return grammar


def json_schema(schema: dict | bool | str) -> str:
    """Output that is JSON valid under `schema` (given as an object, a boolean, or its JSON text)."""
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except json.JSONDecodeError as e:
            raise ValueError(f"the JSON schema is not JSON: {e}") from None
    if not isinstance(schema, dict | bool):
        raise ValueError("a JSON schema must be an object or a boolean")
    try:
        return _checked(LLMatcher.grammar_from_json_schema(schema, defaults=JSON_OPTIONS))
    except ValueError as e:
        raise ValueError(f"invalid JSON schema: {e}") from None


def regex(pattern: str) -> str:
    """Output that full-matches `pattern`."""
    try:
        return _checked(LLMatcher.grammar_from_regex(pattern))
    except ValueError as e:
        raise ValueError(f"invalid regex: {e}") from None


def lark(source: str) -> str:
    """Output in the language of a Lark grammar (llguidance's dialect)."""
    try:
        return _checked(LLMatcher.grammar_from_lark(source))
    except ValueError as e:
        raise ValueError(f"invalid grammar: {e}") from None


def tagged(tags: list[StructTag]) -> str:
    """Free text in which each tag's trigger starts a constrained segment (a tool call)."""
    return lark(StructTag.to_grammar(tags, assume_special=False))
