"""The OpenAI routes against a live server, driven by the official `openai` SDK (errors with `requests`)."""

import functools
import time

import openai
import pytest
import requests

from router.http.openai.chat_template import ChatTemplateError, render_chat
from router.tokenizer import Tokenizer

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def tokenizer(bundled_model_dir) -> Tokenizer:
    return Tokenizer(bundled_model_dir)


@functools.cache
def _hf_tokenizer(model_dir):
    import transformers

    return transformers.AutoTokenizer.from_pretrained(model_dir)


def reference_prompt_tokens(tokenizer: Tokenizer, model_dir, messages, **kw) -> int:
    """Prompt length from transformers' own rendering of the chat template (an independent oracle)."""
    text = _hf_tokenizer(model_dir).apply_chat_template(messages, tokenize=False, **kw)
    return len(tokenizer.encode(text, add_special_tokens=False))


def chat(client, **kw):
    return client.chat.completions.create(model="smol", **{"messages": QUESTION, "temperature": 0, **kw})


def test_models(server):
    body = requests.get(server.url + "/v1/models", timeout=10).json()
    assert body == {
        "object": "list",
        "data": [{"id": "SmolLM2-135M-Instruct", "object": "model", "created": 0, "owned_by": "sluice"}],
    }


def test_chat_stream_matches_non_stream_and_usage_counts_tokens(client, tokenizer, bundled_model_dir):
    full = chat(client, max_tokens=24)
    assert full.object == "chat.completion" and full.id.startswith("chatcmpl-") and full.model == "smol"
    (choice,) = full.choices
    assert choice.index == 0 and choice.message.role == "assistant" and choice.logprobs is None
    assert choice.message.content and "<|im_end|>" not in choice.message.content
    prompt_tokens = reference_prompt_tokens(tokenizer, bundled_model_dir, QUESTION, add_generation_prompt=True)
    assert full.usage.prompt_tokens == prompt_tokens
    assert full.usage.total_tokens == prompt_tokens + full.usage.completion_tokens

    chunks = list(chat(client, max_tokens=24, stream=True, stream_options={"include_usage": True}))
    opening, tokens, usage = chunks[0], chunks[1:-1], chunks[-1]
    assert opening.choices[0].delta.role == "assistant" and opening.choices[0].delta.content == ""
    assert all(c.object == "chat.completion.chunk" and c.id == opening.id for c in chunks)
    assert "".join(c.choices[0].delta.content for c in tokens) == choice.message.content
    assert [c.choices[0].finish_reason for c in tokens] == [None] * (len(tokens) - 1) + [choice.finish_reason]
    assert usage.choices == [] and usage.usage == full.usage
    assert len(tokens) == full.usage.completion_tokens  # one chunk per generated token


def test_stream_without_include_usage_has_no_usage_chunk(client):
    chunks = list(chat(client, max_tokens=3, stream=True))
    assert all(c.choices and c.usage is None for c in chunks)
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")


def test_chat_logprobs_shape(client):
    response = chat(client, max_tokens=6, logprobs=True, top_logprobs=2)
    choice = response.choices[0]
    content = choice.logprobs.content
    assert content and "".join(t.token for t in content) == choice.message.content
    for t in content:
        assert t.bytes == list(t.token.encode()) and t.logprob <= 0
        assert len(t.top_logprobs) == 2 and t.top_logprobs[0].logprob >= t.top_logprobs[1].logprob
        assert t.top_logprobs[0].logprob == pytest.approx(t.logprob)  # greedy picks the top token


def test_chat_n_with_seed_is_reproducible(client):
    kw = {"max_tokens": 10, "temperature": 1.0, "seed": 7, "messages": [{"role": "user", "content": "Tell me a story"}]}
    first, again = chat(client, n=2, **kw), chat(client, n=2, **kw)
    assert [c.index for c in first.choices] == [0, 1]
    assert [c.message.content for c in first.choices] == [c.message.content for c in again.choices]
    assert first.choices[0].message.content != first.choices[1].message.content
    single = chat(client, n=1, **kw)
    assert single.choices[0].message.content == first.choices[0].message.content
    assert first.usage.prompt_tokens == single.usage.prompt_tokens  # the prompt counts once


def test_chat_stop_is_cut_and_max_completion_tokens(client):
    text = chat(client, max_tokens=12).choices[0].message.content
    word = text.split()[2]
    stopped = chat(client, max_tokens=12, stop=[word])
    assert stopped.choices[0].finish_reason == "stop"
    assert stopped.choices[0].message.content == text[: text.index(word)]
    streamed = chat(client, max_tokens=12, stop=word, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed) == text[: text.index(word)]

    short = chat(client, max_completion_tokens=3)
    assert short.choices[0].finish_reason == "length" and short.usage.completion_tokens == 3


def test_chat_continues_a_final_assistant_message(client, tokenizer, bundled_model_dir):
    messages = [*QUESTION, {"role": "assistant", "content": "The capital of France is"}]
    response = chat(client, messages=messages, max_tokens=4)
    assert "Paris" in response.choices[0].message.content
    assert not response.choices[0].message.content.startswith("The capital")
    expected = reference_prompt_tokens(tokenizer, bundled_model_dir, messages, continue_final_message=True)
    assert response.usage.prompt_tokens == expected


def test_chat_content_parts_are_flattened(client):
    parts = [{"role": "user", "content": [{"type": "text", "text": "What is the capital of France?"}]}]
    assert chat(client, messages=parts, max_tokens=5).choices[0].message.content == (
        chat(client, max_tokens=5).choices[0].message.content
    )


def test_ignore_eos_and_min_tokens(client):
    # The instruct model answers an untemplated instruction with an immediate end of sequence.
    plain = client.completions.create(model="smol", prompt="What is 2+2?", max_tokens=8, temperature=0)
    assert plain.usage.completion_tokens == 1 and plain.choices[0].finish_reason == "stop"
    at_least = client.completions.create(
        model="smol", prompt="What is 2+2?", max_tokens=8, temperature=0, extra_body={"min_tokens": 4}
    )
    assert at_least.usage.completion_tokens >= 4
    exact = chat(client, max_tokens=7, extra_body={"ignore_eos": True})
    assert exact.usage.completion_tokens == 7 and exact.choices[0].finish_reason == "length"


def test_completions_prompt_forms(client, tokenizer):
    prompt = "The capital of France is"
    one = client.completions.create(model="smol", prompt=prompt, max_tokens=5, temperature=0)
    assert one.object == "text_completion" and one.id.startswith("cmpl-")
    assert one.usage.prompt_tokens == len(tokenizer.encode(prompt)) and one.usage.completion_tokens == 5
    text = one.choices[0].text

    two = client.completions.create(model="smol", prompt=[prompt, "1, 2, 3,"], max_tokens=5, temperature=0)
    assert [c.index for c in two.choices] == [0, 1] and two.choices[0].text == text
    assert two.usage.prompt_tokens == one.usage.prompt_tokens + len(tokenizer.encode("1, 2, 3,"))

    ids = tokenizer.encode(prompt)
    by_ids = client.completions.create(model="smol", prompt=ids, max_tokens=5, temperature=0)
    assert by_ids.choices[0].text == text
    lists = client.completions.create(model="smol", prompt=[ids, ids[:2]], max_tokens=5, temperature=0)
    assert len(lists.choices) == 2 and lists.choices[0].text == text

    echoed = client.completions.create(model="smol", prompt=prompt, max_tokens=5, temperature=0, echo=True)
    assert echoed.choices[0].text == prompt + text


def test_completions_default_max_tokens_and_logprobs(client):
    response = client.completions.create(
        model="smol", prompt="Once upon a time", temperature=0, logprobs=2, extra_body={"ignore_eos": True}
    )
    choice = response.choices[0]
    assert response.usage.completion_tokens == 16  # OpenAI's default max_tokens
    lp = choice.logprobs
    assert "".join(lp.tokens) == choice.text and len(lp.token_logprobs) == len(lp.tokens)
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(lp.tokens))]
    assert all(tok in top and 2 <= len(top) <= 3 for tok, top in zip(lp.tokens, lp.top_logprobs))


def test_streaming_completions(client):
    prompts = ["The capital of France is", "1, 2, 3,"]
    full = client.completions.create(model="smol", prompt=prompts, max_tokens=6, temperature=0)
    chunks = list(
        client.completions.create(
            model="smol",
            prompt=prompts,
            max_tokens=6,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    texts = ["", ""]
    for c in chunks[:-1]:
        texts[c.choices[0].index] += c.choices[0].text
    assert texts == [c.text for c in full.choices]
    finals = [c.choices[0].finish_reason for c in chunks[:-1] if c.choices[0].finish_reason]
    assert sorted(finals) == sorted(c.finish_reason for c in full.choices)
    assert chunks[-1].choices == [] and chunks[-1].usage == full.usage


@pytest.mark.parametrize(
    ("path", "body", "error", "error_type"),
    [
        (
            "/v1/completions",
            {"prompt": "x", "temperature": -1},
            "Input validation error: `temperature` must be strictly positive",
            "validation",
        ),
        (
            "/v1/completions",
            {"prompt": "x", "suffix": "y"},
            "Suffix is not supported and can be achieved by preprocessing the prompt.",
            "suffix not supported",
        ),
        (
            "/v1/completions",
            {"prompt": []},
            "Empty array detected. Do not use an empty array for the prompt.",
            "empty_array",
        ),
        (
            "/v1/completions",
            {"prompt": ["a"] * 5},
            "Number of prompts exceeds the maximum allowed batch size of 4",
            "batch size exceeded",
        ),
        ("/v1/completions", {"prompt": ""}, "Input validation error: `inputs` cannot be empty", "validation"),
        (
            "/v1/completions",
            {"prompt": "x", "presence_penalty": 2.5},
            "Input validation error: `presence_penalty` must be >= -2.0 and <= 2.0",
            "validation",
        ),
        (
            "/v1/chat/completions",
            {"messages": []},
            "Input validation error: `messages` must be a non-empty array",
            "validation",
        ),
        (
            "/v1/chat/completions",
            {
                "messages": [
                    {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x/a.png"}}]}
                ]
            },
            "Input validation error: `messages[0]`: image content is not supported: this model has no vision input",
            "validation",
        ),
        (
            "/v1/chat/completions",
            {"messages": QUESTION, "logprobs": True, "top_logprobs": 6},
            "Input validation error: `top_logprobs` must be >= 0 and <= 5. Given: 6",
            "validation",
        ),
        (
            "/v1/chat/completions",
            {
                "messages": QUESTION,
                "tools": [{"type": "function", "function": {"name": "f"}}],
                "tool_choice": {"type": "function", "function": {"name": "g"}},
            },
            "Tool error: `tool_choice` names the function `g`, which is not in `tools`",
            "tool_error",
        ),
    ],
)
def test_validation_errors(server, path, body, error, error_type):
    r = requests.post(server.url + path, json=body, timeout=30)
    assert r.status_code == 422
    assert r.json() == {"error": error, "error_type": error_type}


def test_sdk_sees_422_and_top_p_one_is_accepted(client):
    with pytest.raises(openai.UnprocessableEntityError):
        chat(client, max_tokens=2, temperature=-1)
    assert chat(client, max_tokens=2, temperature=0.7, top_p=1.0, seed=1).choices[0].finish_reason


def _metric(server, name: str) -> float:
    for line in requests.get(server.url + "/metrics", timeout=10).text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    return 0.0


def test_client_disconnect_aborts_every_choice(server):
    dropped = 'tgi_request_failure{err="dropped"}'
    before = _metric(server, dropped)
    body = {"messages": QUESTION, "max_tokens": 3000, "n": 2, "stream": True, "ignore_eos": True}
    with requests.post(server.url + "/v1/chat/completions", json=body, stream=True, timeout=30) as r:
        lines = r.iter_lines()
        for _ in range(8):
            next(lines)
    deadline = time.monotonic() + 10
    while (_metric(server, dropped), _metric(server, "tgi_batch_current_size")) != (before + 2, 0):
        assert time.monotonic() < deadline, "the requests of a client that went away are still running"
        time.sleep(0.1)


# The chat template renderer on its own (no server).


def test_template_errors_and_helpers():
    messages = [{"role": "user", "content": "héllo"}]
    with pytest.raises(ChatTemplateError, match="template not found"):
        render_chat(None, {}, messages)
    with pytest.raises(ChatTemplateError, match="no system role"):
        render_chat("{{ raise_exception('no system role') }}", {}, messages)
    source = "{{ bos_token }}{{ messages | tojson }}{% if add_generation_prompt %}>{% endif %}"
    assert (
        render_chat(source, {"bos_token": {"content": "<s>"}}, messages) == '<s>[{"role": "user", "content": "héllo"}]>'
    )
