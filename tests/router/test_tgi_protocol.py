"""Every refusal of TGI's request validation, with TGI's message, and what an accepted request
becomes; no server is started."""

import dataclasses

import pytest

from router.core.request import SamplingParams
from router.http.errors import ValidationError
from router.http.protocol import parse
from router.http.tgi.protocol import TokenizeRequest, validate
from tests.router.stand_ins import LIMITS, ByteTokenizer

TOKENIZER = ByteTokenizer()


def _refusal(body: object, stream: bool = False, limits=LIMITS, **kwargs) -> str:
    with pytest.raises(ValidationError) as e:
        validate(body, TOKENIZER, limits, stream=stream, **kwargs)
    assert e.value.text == "Input validation error: " + e.value.message
    return e.value.message


def _params(**parameters) -> dict:
    return {"inputs": "Hello", "parameters": parameters}


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (["Hello"], "the request body must be a JSON object"),
        ({"parameters": {}}, "missing field `inputs`"),
        ({"inputs": 5}, "`inputs` must be of type string"),
        ({"inputs": ""}, "`inputs` cannot be empty"),
        ({"inputs": "Hello", "parameters": []}, "`parameters` must be of type object"),
        (_params(temperature="hot"), "`temperature` must be of type float"),
        (_params(temperature=float("nan")), "`temperature` must be a finite number"),
        (_params(do_sample="yes"), "`do_sample` must be of type bool"),
        (_params(max_new_tokens=1.5), "`max_new_tokens` must be of type int"),
        (_params(top_k=True), "`top_k` must be of type int"),
        (_params(stop="\n"), "`stop` must be of type array"),
        (_params(stop=["a", 1]), "`stop[1]` must be of type string"),
        (_params(best_of=0), "`best_of` must be > 0 and <= 2. Given: 0"),
        (_params(best_of=3, do_sample=True), "`best_of` must be > 0 and <= 2. Given: 3"),
        (_params(best_of=2), "you must use sampling when `best_of` is > 1"),
        (_params(best_of=2, do_sample=True, seed=1), "`seed` must not be set when `best_of` > 1"),
        (_params(temperature=0), "`temperature` must be strictly positive"),
        (_params(temperature=-1.5), "`temperature` must be strictly positive"),
        (_params(repetition_penalty=0), "`repetition_penalty` must be strictly positive"),
        (_params(frequency_penalty=2.5), "`frequency_penalty` must be >= -2.0 and <= 2.0"),
        (_params(frequency_penalty=-3), "`frequency_penalty` must be >= -2.0 and <= 2.0"),
        (_params(top_k=0), "`top_k` must be strictly positive"),
        (_params(top_k=-1), "`top_k` must be strictly positive"),
        (_params(top_p=0), "`top_p` must be > 0.0 and < 1.0"),
        (_params(top_p=1.0), "`top_p` must be > 0.0 and < 1.0"),
        (_params(typical_p=1.5), "`typical_p` must be > 0.0 and < 1.0"),
        (_params(max_new_tokens=0), "`max_new_tokens` must be strictly positive"),
        (_params(stop=["a", "b", "c", "d", "e"]), "`stop` supports up to 4 stop sequences. Given: 5"),
        (_params(top_n_tokens=6), "`top_n_tokens` must be >= 0 and <= 5. Given: 6"),
        (_params(top_n_tokens=-1), "`top_n_tokens` must be >= 0 and <= 5. Given: -1"),
        (_params(truncate=0), "`truncate` must be strictly positive and less than 1000. Given: 0"),
        (_params(truncate=1001), "`truncate` must be strictly positive and less than 1000. Given: 1001"),
        (_params(seed=-1), "`seed` must be an unsigned 64-bit integer"),
        (_params(seed=2**64), "`seed` must be an unsigned 64-bit integer"),
        (_params(grammar={"type": "json", "value": {"type": "foo"}}), "invalid JSON schema: Invalid type: foo"),
        (
            _params(grammar={"type": "json", "value": "{x"}),
            "the JSON schema is not JSON: Expecting property name enclosed in double quotes: line 1 column 2 (char 1)",
        ),
        (_params(grammar={"type": "regex", "value": 5}), "`value` must be a JSON schema, its JSON text, or a regex"),
        (
            _params(grammar={"type": "json_schema", "value": {"type": "object"}}),
            'a `json_schema` grammar takes `{"name": ..., "schema": ...}` as `value`',
        ),
        (
            _params(grammar={"type": "xml", "value": "<a/>"}),
            "`type` must be 'json', 'json_object', 'json_schema' or 'regex'. Given: xml",
        ),
        (_params(adapter_id="my-lora"), "adapter `my-lora` is not loaded: this server serves no LoRA adapters"),
        ({"inputs": "x" * 128_001}, "`inputs` must have less than 1000 tokens. Given: more than that"),
        ({"inputs": "x" * 1001}, "`inputs` must have less than 1000 tokens. Given: 1001"),
        (
            _params(max_new_tokens=1996),
            "`inputs` tokens + `max_new_tokens` must be <= 2000. Given: 5 `inputs` tokens and 1996 `max_new_tokens`",
        ),
    ],
)
def test_refusals_carry_tgi_messages(body, message):
    assert _refusal(body) == message


def test_rules_of_streams():
    assert _refusal(_params(best_of=2, do_sample=True), stream=True) == (
        "`best_of` != 1 is not supported when streaming tokens"
    )
    assert _refusal(_params(decoder_input_details=True), stream=True) == (
        "`decoder_input_details` == true is not supported when streaming tokens"
    )


def test_best_of_on_a_server_that_allows_only_one():
    limits = dataclasses.replace(LIMITS, max_best_of=1)
    assert (
        _refusal(_params(best_of=2, do_sample=True), limits=limits) == "`best_of` != 1 is not allowed for this endpoint"
    )


def test_refusals_after_tokenization():
    class DroppingTokenizer(ByteTokenizer):
        def encode(self, text, add_special_tokens=True):
            return []

    with pytest.raises(ValidationError, match=r"`inputs` must have at least one token. Given: 0"):
        validate({"inputs": "\x00"}, DroppingTokenizer(), LIMITS, stream=False)
    assert _refusal({"inputs": "x"}, input_ids=[256]) == "token ids must be in [0, 256)"
    assert _refusal({"inputs": "x"}, input_ids=[3, -1]) == "token ids must be in [0, 256)"


def test_tokenize_request():
    with pytest.raises(ValidationError, match="`inputs` must be a non-empty string"):
        parse(TokenizeRequest, {"inputs": ""})
    assert parse(TokenizeRequest, {"inputs": "Hi", "add_special_tokens": False}).inputs == "Hi"


def test_without_parameters_sampling_is_on_and_with_them_off():
    assert validate({"inputs": "Hi"}, TOKENIZER, LIMITS, stream=False).sampling.do_sample
    assert validate({"inputs": "Hi", "parameters": None}, TOKENIZER, LIMITS, stream=False).sampling.do_sample
    assert not validate(_params(), TOKENIZER, LIMITS, stream=False).sampling.do_sample
    assert validate(_params(top_k=5), TOKENIZER, LIMITS, stream=False).sampling.do_sample  # a filter samples


def test_null_means_unset_and_unknown_fields_are_ignored():
    body = {**_params(temperature=None, top_p=None, stop=None, seed=None, grammar=None, adapter_id=None), "x": 1}
    valid = validate(body, TOKENIZER, LIMITS, stream=False)
    assert valid.sampling == SamplingParams()
    assert valid.stop == [] and valid.max_new_tokens == 2000 - 5


def test_every_parameter_reaches_the_request():
    body = _params(
        do_sample=True,
        temperature=0.5,
        top_k=3,
        top_p=0.9,
        typical_p=0.8,
        repetition_penalty=1.2,
        frequency_penalty=-1,
        seed=2**64 - 1,
        truncate=3,
        max_new_tokens=7,
        top_n_tokens=2,
        stop=["\n", ""],
        watermark=True,
        details=True,
        decoder_input_details=True,
        return_full_text=True,
    )
    valid = validate(body, TOKENIZER, LIMITS, stream=False)
    assert valid.input_ids == list(b"llo")
    assert valid.sampling == SamplingParams(
        do_sample=True,
        temperature=0.5,
        top_k=3,
        top_p=0.9,
        typical_p=0.8,
        repetition_penalty=1.2,
        frequency_penalty=-1.0,
        seed=2**64 - 1,
        watermark=True,
        top_n_tokens=2,
    )
    assert (valid.max_new_tokens, valid.stop, valid.best_of) == (7, ["\n"], 1)
    assert valid.details and valid.decoder_input_details and valid.return_full_text and valid.is_seeded


def test_sampling_without_a_seed_draws_one():
    seeds = {validate(_params(do_sample=True), TOKENIZER, LIMITS, stream=False).sampling.seed for _ in range(4)}
    assert len(seeds) == 4


@pytest.mark.parametrize(
    ("grammar", "expected"),
    [
        ({"type": "json", "value": {"type": "integer"}}, '"json_schema":{"type":"integer"'),
        ({"type": "json", "value": '{"type": "integer"}'}, '"json_schema":{"type":"integer"'),
        ({"type": "json_object", "value": {"type": "integer"}}, '"json_schema":{"type":"integer"'),
        (
            {"type": "json_schema", "value": {"name": "n", "schema": {"type": "integer"}}},
            '"json_schema":{"type":"integer"',
        ),
        ({"type": "regex", "value": "[0-9]{3}"}, "[0-9]{3}"),
    ],
)
def test_grammars_reach_the_request(grammar, expected):
    valid = validate(_params(grammar=grammar), TOKENIZER, LIMITS, stream=False)
    assert expected in valid.grammar and valid.generation().grammar == valid.grammar
