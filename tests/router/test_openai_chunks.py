"""Streamed chunks whose choice is text alone are spliced into a JSON template: the bytes must be
those pydantic writes for the same chunk, whatever the text."""

import json
import random

import pytest

from router.core.engine import Token, TokenEvent
from router.http.openai.plan import parse_chat, parse_completion
from router.http.openai.responses import envelope
from router.http.openai.routes import _ChatChunks, _CompletionChunks
from router.http.protocol import dump
from tests.router.stand_ins import LIMITS, ByteTokenizer

TOKENIZER = ByteTokenizer()


def _texts() -> list[str]:
    """Control characters, quotes and backslashes, DEL, every plane of Unicode, and random mixes."""
    rng = random.Random(0)
    texts = [
        "",
        "plain",
        '"',
        "\\",
        "\\u007f",
        "\x7f",
        "a\x7fb",
        "\x00\x1f\n\t\r\b\f",
        "é",
        "\u2028",
        "😀",
        "\U0010ffff",
    ]
    for _ in range(2000):
        spans = [(0, 128), (128, 0xD800), (0xE000, 0x110000)]
        texts.append("".join(chr(rng.randrange(*rng.choice(spans))) for _ in range(rng.randrange(1, 6))))
    return texts


@pytest.mark.parametrize("include_usage", [False, True])
@pytest.mark.parametrize("route", ["chat", "completion"])
def test_a_text_chunk_is_what_pydantic_writes(route, include_usage):
    body = {"max_tokens": 4, "n": 2, "stream": True, "stream_options": {"include_usage": include_usage}}
    if route == "chat":
        plan = parse_chat({**body, "messages": [{"role": "user", "content": "hi"}]}, TOKENIZER, LIMITS)
        chunks = _ChatChunks(plan, envelope("chat", "m"))
    else:
        plan = parse_completion({**body, "prompt": "hi"}, TOKENIZER, LIMITS)
        chunks = _CompletionChunks(plan, envelope("text_completion", "m"))
    exclude = None if include_usage else {"usage"}
    for i, text in enumerate(_texts()):
        index = i % 2
        (spliced,) = chunks.token(index, TokenEvent(Token(7, text, -0.5, False), []))
        assert isinstance(spliced, str), "a text-only chunk takes the template"
        assert spliced == dump(chunks.plain.build(index, text), exclude), repr(text)
        assert json.loads(spliced)["choices"][0]["index"] == index
