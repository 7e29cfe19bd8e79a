"""Greedy generations through the HTTP API equal transformers' `generate(do_sample=False)`."""

import concurrent.futures

import pytest
import requests
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from router.tokenizer import Tokenizer

MAX_NEW_TOKENS = 24
LONG_PROMPT = (
    " ".join(
        f"Line {i}: the river carries {i * 7 % 13} boats past the mill, and the miller counts them." for i in range(24)
    )
    + " Summarize what the miller saw:"
)


def _prompts(tokenizer) -> list[str]:
    chat = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Give me three tips for writing clear code."}],
        tokenize=False,
        add_generation_prompt=True,
    )
    return [
        "The capital of France is",
        "def fibonacci(n):",
        "Once upon a time, in a small village by the sea,",
        "1, 2, 3, 4, 5,",
        "Translate to French: I like apples. ->",
        "Les montagnes du Japon sont",
        chat,
        LONG_PROMPT,
    ]


@pytest.fixture(scope="module")
def hf(bundled_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(bundled_model_dir)
    model = AutoModelForCausalLM.from_pretrained(bundled_model_dir, dtype=torch.float32).eval()
    return tokenizer, model


def _generate_ids(url: str, prompt: str, max_new_tokens: int = MAX_NEW_TOKENS) -> list[int]:
    r = requests.post(
        url + "/generate",
        json={
            "inputs": prompt,
            "parameters": {"max_new_tokens": max_new_tokens, "details": True},
        },
        timeout=300,
    )
    assert r.status_code == 200, r.text
    return [t["id"] for t in r.json()["details"]["tokens"]]


def test_router_tokenizer_matches_transformers(hf, bundled_model_dir):
    tokenizer, _ = hf
    ours = Tokenizer(bundled_model_dir)
    for prompt in _prompts(tokenizer):
        assert ours.encode(prompt) == tokenizer(prompt).input_ids


def test_greedy_tokens_equal_transformers(server, hf):
    tokenizer, model = hf
    prompts = _prompts(tokenizer)
    assert len(tokenizer(LONG_PROMPT).input_ids) > 300
    for prompt in prompts:
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=MAX_NEW_TOKENS, do_sample=False)
        expected = out[0, ids.shape[1] :].tolist()
        assert _generate_ids(server.url, prompt) == expected, prompt[:60]


def test_concurrent_requests_equal_requests_alone(server, hf):
    """16 greedy requests of different lengths in flight together give what each gives alone."""
    tokenizer, _ = hf
    base = _prompts(tokenizer)
    prompts = [base[i % len(base)][: 20 + 37 * i] for i in range(16)]
    lengths = [8 + 3 * i for i in range(16)]
    alone = [_generate_ids(server.url, p, n) for p, n in zip(prompts, lengths)]
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        together = list(pool.map(lambda a: _generate_ids(server.url, *a), zip(prompts, lengths)))
    assert together == alone
