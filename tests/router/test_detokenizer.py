"""Incremental detokenization: complete characters only, concatenation equals the full decode."""

import pytest

from router.tokenizer import IncrementalDetokenizer, Tokenizer

TEXTS = [
    "Hello world, this is plain ASCII text.",
    "大海啊，全是水。🌊🐟 Biển cả thật đẹp, tiếng Việt có dấu.",
    "emoji 👩‍👩‍👧‍👦 family and ñandú and Ωmega",
]


@pytest.fixture(scope="module")
def tokenizer(bundled_model_dir):
    return Tokenizer(bundled_model_dir)


@pytest.mark.parametrize("text", TEXTS)
def test_streamed_text_equals_the_full_decode(tokenizer, text):
    prompt = tokenizer.encode("Say something:")
    ids = tokenizer.encode(" " + text)
    detok = IncrementalDetokenizer(tokenizer, prompt)
    pieces = [detok.add(i) for i in ids]
    pieces.append(detok.flush())
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) == detok.text == tokenizer.decode(prompt + ids)[len(tokenizer.decode(prompt)) :]


def test_multibyte_characters_wait_for_their_last_byte(tokenizer):
    ids = tokenizer.encode("🌊")
    assert len(ids) > 1  # byte-level pieces
    detok = IncrementalDetokenizer(tokenizer, [])
    assert [detok.add(i) for i in ids[:-1]] == [""] * (len(ids) - 1)
    assert detok.add(ids[-1]) == "🌊"


def test_special_tokens_show_their_literal_but_stay_out_of_the_text(tokenizer):
    eos = tokenizer.encode("<|im_end|>")[0]
    assert eos in tokenizer.special_ids
    detok = IncrementalDetokenizer(tokenizer, [])
    detok.add(tokenizer.encode("Hi")[0])
    assert detok.add(eos) == "<|im_end|>" and detok.text == "Hi"
