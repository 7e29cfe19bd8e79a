"""A tokenizer of the router's own, so the core's tests need neither the bundled model nor `make model`."""

import json

import pytest
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import models, pre_tokenizers

from router.tokenizer import Tokenizer

SPECIAL = {"<unk>": 0, "<s>": 1, "</s>": 2}  # </s> (2) is the EOS the engine tests use


@pytest.fixture(scope="session")
def tiny_tokenizer(tmp_path_factory) -> Tokenizer:
    """Whole words w3 .. w511, one token each; anything else is <unk>."""
    vocab = {**SPECIAL, **{f"w{i}": i for i in range(len(SPECIAL), 512)}}
    tok = HFTokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(list(SPECIAL))
    path = tmp_path_factory.mktemp("tiny-tokenizer")
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))
    return Tokenizer(path)
