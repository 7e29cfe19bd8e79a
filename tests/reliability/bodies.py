"""Hypothesis strategies for hostile request bodies on every POST route (tests/reliability/test_hostile_input.py):
malformed and adversarial bodies per route, clean ones (valid, at most 4 new tokens) and those spoiled in one
field, raw bytes that are not JSON at all, and the content types they are sent with."""

import json

from hypothesis import strategies as st

POST_ROUTES = ["/", "/generate", "/generate_stream", "/tokenize", "/v1/chat/completions", "/v1/completions"]


def _nested(depth: int) -> list:
    value: list = []
    for _ in range(depth):
        value = [value]
    return value


HUGE = [1e308, -1e308, 2**70, -(2**70), 2**64, 2**63 - 1, -1, 0, 0.5, -0.0, float("nan"), float("inf"), float("-inf")]
SPECIAL_TEXT = [
    "",
    " ",
    "\x00",
    "\ud800",
    "\udfff",
    "a\ud83d",
    "😀" * 5,
    "<|im_end|>",
    "<|endoftext|>",
    "\u202e",
    "%s%n",
]
texts = st.one_of(
    st.text(max_size=24),
    st.sampled_from(SPECIAL_TEXT),
    st.sampled_from([1_000, 20_000, 70_000]).map(lambda n: "ab " * (n // 3)),  # long, and over 64 x max-total
)
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.sampled_from(HUGE),
    st.integers(),
    st.floats(allow_nan=True, allow_infinity=True),
    texts,
)
weird = st.one_of(
    scalars,
    st.lists(scalars, max_size=3),
    st.dictionaries(st.text(max_size=6), scalars, max_size=3),
    st.integers(1, 400).map(lambda d: _nested(d)),  # deeper ones are sent as raw bytes
)
# An invalid value for a token limit (never null: null means "no limit", a long generation).
bad_limit = st.one_of(
    st.sampled_from([0, -1, -(2**70), 2**70, 1e308, float("nan"), float("inf"), 1.5, 2.0, True, "4", [4], {"n": 4}]),
    st.integers(max_value=0),
)
small_limit = st.integers(1, 4)
limit = st.one_of(small_limit, small_limit, bad_limit)
small_int = st.one_of(st.integers(1, 3), bad_limit)
stops = st.one_of(st.lists(texts, max_size=4), texts, weird)
UNKNOWN = st.dictionaries(st.sampled_from(["foo", "__proto__", "constructor", "inputs2", "💥", ""]), weird, max_size=2)


def _maybe(draw, fields: dict) -> dict:
    """Each field of `fields` (a strategy) present or not."""
    return {k: draw(v) for k, v in fields.items() if draw(st.booleans())}


@st.composite
def tgi_body(draw) -> object:
    params = _maybe(
        draw,
        {
            "do_sample": st.one_of(st.booleans(), weird),
            "temperature": st.one_of(st.floats(0.01, 3), weird),
            "top_k": st.one_of(st.integers(-3, 50), weird),
            "top_p": st.one_of(st.floats(0, 1.2), weird),
            "typical_p": st.one_of(st.floats(0, 1.2), weird),
            "repetition_penalty": st.one_of(st.floats(0, 3), weird),
            "frequency_penalty": st.one_of(st.floats(-3, 3), weird),
            "best_of": small_int,
            "seed": st.one_of(st.integers(-5, 2**65), weird),
            "stop": stops,
            "truncate": st.one_of(st.integers(-3, 2000), weird),
            "details": st.one_of(st.booleans(), weird),
            "decoder_input_details": st.one_of(st.booleans(), weird),
            "return_full_text": st.one_of(st.booleans(), weird),
            "top_n_tokens": st.one_of(st.integers(-2, 6), weird),
            "watermark": st.one_of(st.booleans(), weird),
            "grammar": weird,
            "adapter_id": weird,
        },
    )
    params["max_new_tokens"] = draw(limit)
    params.update(draw(UNKNOWN))
    body = {"inputs": draw(st.one_of(texts, texts, weird)), "parameters": params}
    if draw(st.integers(0, 9)) == 0:  # parameters of the wrong type (null would mean "no limit")
        body["parameters"] = draw(weird.filter(lambda v: v is not None and not isinstance(v, dict)))
    body.update(_maybe(draw, {"stream": st.one_of(st.booleans(), weird)}))
    body.update(draw(UNKNOWN))
    return body


def _openai_common(draw) -> dict:
    body = _maybe(
        draw,
        {
            "model": weird,
            "n": small_int,
            "stream": st.one_of(st.booleans(), weird),
            "stream_options": st.one_of(
                st.fixed_dictionaries({"include_usage": st.one_of(st.booleans(), weird)}), weird
            ),
            "temperature": st.one_of(st.floats(0, 2), weird),
            "top_p": st.one_of(st.floats(0, 1.5), weird),
            "seed": st.one_of(st.integers(-5, 2**65), weird),
            "stop": stops,
            "presence_penalty": st.one_of(st.just(0), weird),
            "frequency_penalty": st.one_of(st.floats(-3, 3), weird),
            "logit_bias": weird,
            "best_of": weird,
            "min_tokens": st.one_of(st.integers(-1, 5), weird),
            "ignore_eos": st.one_of(st.booleans(), weird),
            "user": weird,
        },
    )
    body.update(draw(UNKNOWN))
    return body


messages = st.one_of(
    st.lists(
        st.fixed_dictionaries(
            {"role": st.one_of(st.sampled_from(["user", "system", "assistant", "tool", "developer"]), weird)},
            optional={
                "content": st.one_of(
                    texts,
                    st.lists(
                        st.one_of(
                            st.fixed_dictionaries({"type": st.just("text"), "text": texts}),
                            st.fixed_dictionaries({"type": st.just("image_url"), "image_url": weird}),
                            weird,
                        ),
                        max_size=3,
                    ),
                    weird,
                ),
                "name": weird,
                "tool_calls": weird,
            },
        ),
        max_size=4,
    ),
    weird,
)


@st.composite
def chat_body(draw) -> object:
    body = _openai_common(draw)
    body["messages"] = draw(messages)
    body.update(
        _maybe(
            draw,
            {
                "logprobs": st.one_of(st.booleans(), weird),
                "top_logprobs": st.one_of(st.integers(-1, 6), weird),
                "response_format": st.one_of(
                    st.fixed_dictionaries({"type": st.sampled_from(["text", "json_object"])}), weird
                ),
                "tools": weird,
                "tool_choice": weird,
            },
        )
    )
    key = draw(st.sampled_from(["max_tokens", "max_completion_tokens"]))
    body[key] = draw(limit)
    return body


token_ids = st.lists(st.one_of(st.integers(0, 49151), st.sampled_from([-1, 49152, 2**70, 1.5, "1"])), max_size=12)
prompts = st.one_of(texts, st.lists(texts, max_size=5), token_ids, st.lists(token_ids, max_size=5), weird)


@st.composite
def completion_body(draw) -> object:
    body = _openai_common(draw)
    body["prompt"] = draw(prompts)
    body.update(
        _maybe(
            draw,
            {
                "echo": st.one_of(st.booleans(), weird),
                "logprobs": st.one_of(st.integers(-1, 6), weird),
                "suffix": weird,
            },
        )
    )
    body["max_tokens"] = draw(limit)
    return body


@st.composite
def tokenize_body(draw) -> object:
    body = {"inputs": draw(st.one_of(texts, weird))}
    body.update(_maybe(draw, {"add_special_tokens": weird, "parameters": weird}))
    body.update(draw(UNKNOWN))
    return body


# Mostly valid bodies (at most one field hostile): they reach tokenization, the chat template and the engine.
clean_text = st.one_of(st.text(min_size=1, max_size=24), st.sampled_from(SPECIAL_TEXT[1:]))


@st.composite
def clean_tgi_body(draw) -> object:
    params = _maybe(
        draw,
        {
            "do_sample": st.booleans(),
            "temperature": st.floats(0.05, 2),
            "top_k": st.integers(1, 50),
            "top_p": st.floats(0.05, 0.95),
            "repetition_penalty": st.floats(0.5, 2),
            "frequency_penalty": st.floats(-2, 2),
            "seed": st.integers(0, 2**64 - 1),
            "stop": st.lists(clean_text, max_size=2),
            "truncate": st.integers(1, 500),
            "details": st.booleans(),
            "decoder_input_details": st.booleans(),
            "return_full_text": st.booleans(),
            "top_n_tokens": st.integers(0, 3),
            "watermark": st.booleans(),
        },
    )
    params["max_new_tokens"] = draw(small_limit)
    body = {"inputs": draw(clean_text), "parameters": params}
    body.update(_maybe(draw, {"stream": st.booleans()}))
    return _spoil(draw, body)


@st.composite
def clean_chat_body(draw) -> object:
    body = _maybe(
        draw,
        {
            "n": st.integers(1, 2),
            "stream": st.booleans(),
            "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}),
            "temperature": st.floats(0, 2),
            "top_p": st.floats(0.05, 1),
            "seed": st.integers(0, 2**64 - 1),
            "stop": st.one_of(clean_text, st.lists(clean_text, max_size=2)),
            "logprobs": st.just(True),
            "top_logprobs": st.integers(0, 3),
            "min_tokens": st.integers(0, 2),
            "ignore_eos": st.booleans(),
        },
    )
    role = st.sampled_from(["user", "system", "assistant"])
    body["messages"] = draw(
        st.lists(st.fixed_dictionaries({"role": role, "content": clean_text}), min_size=1, max_size=3)
    )
    body["max_tokens"] = draw(small_limit)
    return _spoil(draw, body)


@st.composite
def clean_completion_body(draw) -> object:
    body = _maybe(
        draw,
        {
            "n": st.integers(1, 2),
            "stream": st.booleans(),
            "echo": st.booleans(),
            "temperature": st.floats(0, 2),
            "seed": st.integers(0, 2**64 - 1),
            "stop": st.one_of(clean_text, st.lists(clean_text, max_size=2)),
            "min_tokens": st.integers(0, 2),
        },
    )
    ids = st.lists(st.integers(0, 49151), min_size=1, max_size=8)
    body["prompt"] = draw(
        st.one_of(clean_text, st.lists(clean_text, min_size=1, max_size=2), ids, st.lists(ids, max_size=2))
    )
    if not body.get("echo"):
        body.update(_maybe(draw, {"logprobs": st.integers(0, 3)}))
    body["max_tokens"] = draw(small_limit)
    return _spoil(draw, body)


def _spoil(draw, body: dict) -> dict:
    """Half the time, one field (not the token limit) replaced by a hostile value."""
    keys = [k for k in body if k not in ("max_new_tokens", "max_tokens")]
    if keys and draw(st.booleans()):
        key = draw(st.sampled_from(keys))
        if key == "parameters":  # a dict without max_new_tokens, or null, would mean "no limit": a long generation
            body[key] = draw(weird.filter(lambda v: v is not None and not isinstance(v, dict)))
        else:
            body[key] = draw(weird)
    return body


CLEAN_BODIES = {
    "/": clean_tgi_body(),
    "/generate": clean_tgi_body(),
    "/generate_stream": clean_tgi_body(),
    "/tokenize": st.builds(lambda t: {"inputs": t}, clean_text),
    "/v1/chat/completions": clean_chat_body(),
    "/v1/completions": clean_completion_body(),
}

BODIES = {
    "/": tgi_body(),
    "/generate": tgi_body(),
    "/generate_stream": tgi_body(),
    "/tokenize": tokenize_body(),
    "/v1/chat/completions": chat_body(),
    "/v1/completions": completion_body(),
}


def encode(body: object) -> bytes:
    """JSON as Python writes it: NaN and Infinity literals included, lone surrogates escaped."""
    return json.dumps(body, allow_nan=True).encode()


raw_bodies = st.one_of(
    st.binary(max_size=64),
    st.sampled_from(
        [
            b"",
            b"\xff\xfe\x00",
            b'{"inputs": "\xc3\x28"}',  # invalid UTF-8 inside a string
            b'{"inputs": "\xed\xa0\x80"}',  # a UTF-8-encoded surrogate
            b'{"inputs": NaN, "parameters": {"max_new_tokens": Infinity}}',
            b'{"inputs": "x", "parameters": {"max_new_tokens": 1' + b"0" * 5000 + b"}}",
            b'{"inputs": "x", "parameters": {"temperature": 1e999, "max_new_tokens": 2}}',
            b'{"inputs": "x", "parameters": {"max_new_tokens": 2}',
            b'{"inputs": "x"}}',
            b"null",
            b"[]",
            b"123",
            b'"inputs"',
        ]
    ),
    st.sampled_from([100, 900, 1200, 5000, 100_000]).map(lambda d: b"[" * d + b"]" * d),
    st.sampled_from([100, 5000, 100_000]).map(lambda d: b'{"inputs": "x", "parameters": ' + b"[" * d + b"]" * d + b"}"),
)
CONTENT_TYPES = [
    "application/json",
    "application/json",
    "application/json; charset=latin-1",
    "text/plain",
    None,
    "application/x-www-form-urlencoded",
    "multipart/form-data; boundary=xyz",
]


@st.composite
def hostile_request(draw) -> tuple[str, bytes, str | None, object]:
    route = draw(st.sampled_from(POST_ROUTES))
    if draw(st.integers(0, 4)) == 0:
        return route, draw(raw_bodies), draw(st.sampled_from(CONTENT_TYPES)), None
    if draw(st.integers(0, 9)) == 0:  # valid JSON that is not an object
        body = draw(weird.filter(lambda v: not isinstance(v, dict)))
    else:
        body = draw(st.one_of(BODIES[route], CLEAN_BODIES[route]))
    return route, encode(body), draw(st.sampled_from(CONTENT_TYPES)), body
