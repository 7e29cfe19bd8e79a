"""Validation's bounds on work: a truncated body is not tokenized in full (the tokenizer's work
is bounded before it runs), and every `best_of` sequence counts against the concurrency limit."""

import dataclasses
import types

from aiohttp.test_utils import TestClient, TestServer

from router.http.app import build_app
from router.http.tgi.protocol import validate
from router.tokenizer import Tokenizer
from tests.router.stand_ins import LIMITS, ByteTokenizer, stand_in_state


class RecordingTokenizer(ByteTokenizer):
    def __init__(self):
        self.encoded: list[int] = []

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        self.encoded.append(len(text))
        return super().encode(text, add_special_tokens)


def test_a_truncated_body_is_tokenized_only_near_its_end():
    tokenizer = RecordingTokenizer()
    text = "x" * 1_900_000 + "the end"
    valid = validate({"inputs": text, "parameters": {"truncate": 10}}, tokenizer, LIMITS, stream=False)
    assert valid.input_ids == list(b"xxxthe end")
    assert tokenizer.encoded and max(tokenizer.encoded) < 2_000


def test_truncation_keeps_the_same_tokens_as_tokenizing_in_full(bundled_model_dir):
    tokenizer = Tokenizer(bundled_model_dir)
    words = " ".join(f"word{i % 97}, and some punctuation; émoji 🌊 {i}" for i in range(20_000))
    for truncate in (1, 7, 300):
        valid = validate({"inputs": words, "parameters": {"truncate": truncate}}, tokenizer, LIMITS, stream=False)
        assert valid.input_ids == tokenizer.encode(words)[-truncate:]


async def test_each_best_of_sequence_holds_a_concurrency_slot():
    """One request running and a limit of 2: a best_of=2 request needs 2 more, so 429."""
    running_one = types.SimpleNamespace(is_healthy=True, num_requests=1)
    state = dataclasses.replace(stand_in_state(max_concurrent_requests=2), engine=running_one)
    async with TestClient(TestServer(build_app(state, payload_limit=1000))) as client:
        body = {"inputs": "Hello", "parameters": {"best_of": 2, "do_sample": True}}
        response = await client.post("/generate", json=body)
        assert response.status == 429
        assert await response.json() == {"error": "Model is overloaded", "error_type": "overloaded"}
