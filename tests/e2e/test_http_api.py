"""TGI's request and response shapes, validation and streaming, against a live server."""

import json
import socket
import time

import pytest
import requests


def post(server, path, body, **kw):
    return requests.post(server.url + path, json=body, timeout=120, **kw)


def sse_events(response) -> list[dict]:
    return [json.loads(line[5:]) for line in response.iter_lines(decode_unicode=True) if line.startswith("data:")]


@pytest.mark.parametrize(
    ("parameters", "message"),
    [
        ({"temperature": 0}, "`temperature` must be strictly positive"),
        ({"repetition_penalty": 0}, "`repetition_penalty` must be strictly positive"),
        ({"frequency_penalty": 3}, "`frequency_penalty` must be >= -2.0 and <= 2.0"),
        ({"top_p": 1.0}, "`top_p` must be > 0.0 and < 1.0"),
        ({"typical_p": 0}, "`typical_p` must be > 0.0 and < 1.0"),
        ({"top_k": 0}, "`top_k` must be strictly positive"),
        ({"top_k": -1}, "`top_k` must be strictly positive"),
        ({"adapter_id": "my-lora"}, "adapter `my-lora` is not loaded: this server serves no LoRA adapters"),
        ({"max_new_tokens": 0}, "`max_new_tokens` must be strictly positive"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "`stop` supports up to 4 stop sequences. Given: 5"),
        ({"top_n_tokens": 6}, "`top_n_tokens` must be >= 0 and <= 5. Given: 6"),
        ({"truncate": 0}, "`truncate` must be strictly positive and less than 4095. Given: 0"),
        ({"best_of": 3, "do_sample": True}, "`best_of` must be > 0 and <= 2. Given: 3"),
        ({"best_of": 2}, "you must use sampling when `best_of` is > 1"),
        ({"best_of": 2, "do_sample": True, "seed": 1}, "`seed` must not be set when `best_of` > 1"),
        (
            {"max_new_tokens": 5000},
            "`inputs` tokens + `max_new_tokens` must be <= 4096. Given: 2 `inputs` tokens and 5000 `max_new_tokens`",
        ),
        ({"temperature": "hot"}, "`temperature` must be of type float"),
    ],
)
def test_validation_errors_are_422_with_tgi_messages(server, parameters, message):
    r = post(server, "/generate", {"inputs": "Hello there", "parameters": parameters})
    assert r.status_code == 422
    assert r.json() == {"error": f"Input validation error: {message}", "error_type": "validation"}


def test_best_of_and_grammar_rules(server):
    r = post(server, "/generate_stream", {"inputs": "x", "parameters": {"best_of": 2, "do_sample": True}})
    assert r.status_code == 422
    assert r.json()["error"] == "Input validation error: `best_of` != 1 is not supported when streaming tokens"
    r = post(server, "/generate", {"inputs": "x", "parameters": {"grammar": {"type": "regex", "value": "a+("}}})
    assert r.status_code == 422 and r.json()["error"].startswith("Input validation error: invalid regex")


def test_empty_inputs_and_stream_only_rules(server):
    r = post(server, "/generate", {"inputs": "", "parameters": {}})
    assert r.json()["error"] == "Input validation error: `inputs` cannot be empty"
    r = post(server, "/generate_stream", {"inputs": "x", "parameters": {"decoder_input_details": True}})
    assert r.status_code == 422
    assert "`decoder_input_details` == true is not supported when streaming tokens" in r.json()["error"]


def test_malformed_json_is_400_and_oversized_body_is_413(server):
    json_type = {"Content-Type": "application/json"}
    r = requests.post(server.url + "/generate", data=b"{not json", headers=json_type, timeout=10)
    assert r.status_code == 400 and r.json()["error_type"] == "bad_request"
    r = requests.post(server.url + "/generate", data=b"x" * 2_100_000, headers=json_type, timeout=10)
    assert r.status_code == 413 and "error" in r.json()


@pytest.mark.parametrize("content_type", [None, "text/plain", "application/x-www-form-urlencoded"])
def test_a_body_that_is_not_declared_json_is_415(server, content_type):
    """TGI's answer; it also keeps browsers from posting cross-origin without a CORS preflight."""
    headers = {"Content-Type": content_type} if content_type else {}
    body = b'{"inputs": "Hi", "parameters": {"max_new_tokens": 1}}'
    r = requests.post(server.url + "/generate", data=body, headers=headers, timeout=10)
    assert r.status_code == 415, r.text
    assert r.json() == {
        "error": "Expected request with `Content-Type: application/json`",
        "error_type": "unsupported_media_type",
    }
    for content_type in ("application/json; charset=utf-8", "application/vnd.api+json"):
        r = requests.post(server.url + "/generate", data=body, headers={"Content-Type": content_type}, timeout=60)
        assert r.status_code == 200, (content_type, r.text)


def test_generate_details_shape_and_headers(server):
    r = post(
        server,
        "/generate",
        {"inputs": "The capital of France is", "parameters": {"max_new_tokens": 5, "details": True, "top_n_tokens": 2}},
    )
    assert r.status_code == 200
    body = r.json()
    details = body["details"]
    assert details["finish_reason"] == "length" and details["generated_tokens"] == 5 and details["seed"] is None
    assert details["prefill"] == [] and len(details["tokens"]) == 5
    assert set(details["tokens"][0]) == {"id", "text", "logprob", "special"}
    assert [len(t) for t in details["top_tokens"]] == [2] * 5
    assert body["generated_text"] == "".join(t["text"] for t in details["tokens"])
    assert r.headers["x-generated-tokens"] == "5" and r.headers["x-prompt-tokens"] == "5"
    for h in (
        "x-compute-time",
        "x-total-time",
        "x-validation-time",
        "x-queue-time",
        "x-inference-time",
        "x-time-per-token",
    ):
        assert h in r.headers


def test_return_full_text_and_compat_route(server):
    body = {"inputs": "The capital of France is", "parameters": {"max_new_tokens": 3, "return_full_text": True}}
    text = post(server, "/generate", body).json()["generated_text"]
    assert text.startswith("The capital of France is")
    compat = post(server, "/", body).json()
    assert compat == [{"generated_text": text}]


def test_stream_concatenates_to_generated_text_for_multibyte_output(server):
    prompt = "<|im_start|>user\n用中文写一句关于大海的话，并加上表情符号 🌊<|im_end|>\n<|im_start|>assistant\n"
    r = post(
        server,
        "/generate_stream",
        {"inputs": prompt, "parameters": {"max_new_tokens": 40, "details": True}},
        stream=True,
    )
    assert r.headers["Content-Type"].startswith("text/event-stream") and r.headers["X-Accel-Buffering"] == "no"
    events = sse_events(r)
    assert [e["index"] for e in events] == list(range(1, len(events) + 1))
    final = events[-1]
    assert all(e["generated_text"] is None for e in events[:-1])
    streamed = "".join(e["token"]["text"] for e in events if not e["token"]["special"])
    assert streamed == final["generated_text"] and "\ufffd" not in streamed
    assert any(ord(c) > 0x2E80 for c in streamed)  # the model did answer with CJK characters
    assert final["details"]["generated_tokens"] == len(events) and final["details"]["input_length"] > 10


def test_stop_sequence_ends_generation_and_is_kept(server):
    r = post(
        server,
        "/generate",
        {"inputs": "1, 2, 3, 4, 5,", "parameters": {"max_new_tokens": 30, "stop": [" 8"], "details": True}},
    )
    body = r.json()
    assert body["details"]["finish_reason"] == "stop_sequence"
    assert body["generated_text"].endswith(" 8")


def test_seeded_sampling_is_reproducible_and_echoes_the_seed(server):
    body = {
        "inputs": "Once upon a time",
        "parameters": {
            "do_sample": True,
            "temperature": 0.9,
            "top_k": 50,
            "top_p": 0.95,
            "seed": 1234,
            "max_new_tokens": 12,
            "details": True,
        },
    }
    first, second = post(server, "/generate", body).json(), post(server, "/generate", body).json()
    assert first == second and first["details"]["seed"] == 1234
    other = post(server, "/generate", {**body, "parameters": {**body["parameters"], "seed": 99}}).json()
    assert other["generated_text"] != first["generated_text"]


def test_unseeded_sampling_draws_a_seed(server):
    r = post(
        server,
        "/generate",
        {"inputs": "Hello", "parameters": {"do_sample": True, "max_new_tokens": 2, "details": True}},
    )
    assert isinstance(r.json()["details"]["seed"], int)


def test_info_and_health(server):
    assert requests.get(server.url + "/health", timeout=10).status_code == 200
    info = requests.get(server.url + "/info", timeout=10).json()
    assert info["model_id"] == "SmolLM2-135M-Instruct" and info["max_total_tokens"] == 4096
    assert info["max_input_tokens"] == 4095 and info["max_stop_sequences"] == 4


def _metric(server, name: str) -> float:
    """A sample's value; 0 for a labelled sample not recorded yet."""
    text = requests.get(server.url + "/metrics", timeout=10).text
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    if "{" in name:
        return 0.0
    raise KeyError(name)


def _wait_for_idle_blocks(server, timeout_s: float = 10) -> float:
    total = _metric(server, "sluice_kv_blocks_total")
    deadline = time.monotonic() + timeout_s
    while _metric(server, "sluice_kv_blocks_free") != total and time.monotonic() < deadline:
        time.sleep(0.05)
    return total


@pytest.mark.parametrize("path", ["/generate_stream", "/generate"])
def test_client_disconnect_frees_blocks(server, path):
    _wait_for_idle_blocks(server)
    dropped = _metric(server, 'tgi_request_failure{err="dropped"}')
    body = {"inputs": "1, 2, 3, 4, 5, 6, 7, 8,", "parameters": {"max_new_tokens": 1000}}
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        payload = json.dumps(body).encode()
        head = f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {len(payload)}"
        sock.sendall(head.encode() + b"\r\n\r\n" + payload)
        deadline = time.monotonic() + 30
        while _metric(server, "sluice_kv_blocks_free") == _metric(server, "sluice_kv_blocks_total"):
            assert time.monotonic() < deadline, "the request never started"
            time.sleep(0.02)
        time.sleep(0.3)  # a few tokens into the generation
    total = _wait_for_idle_blocks(server)
    assert _metric(server, "sluice_kv_blocks_free") == total
    assert _metric(server, 'tgi_request_failure{err="dropped"}') == dropped + 1


def test_metrics_use_tgi_names(server):
    post(server, "/generate", {"inputs": "Hi", "parameters": {"max_new_tokens": 2}})
    text = requests.get(server.url + "/metrics", timeout=10).text
    for name in (
        "tgi_request_count",
        "tgi_request_success",
        "tgi_request_duration_bucket",
        "tgi_queue_size",
        "tgi_batch_current_size",
        "tgi_request_generated_tokens_bucket",
        "tgi_batch_forward_duration_bucket",
        "tgi_request_input_length_bucket",
        "tgi_batch_max_total_tokens",
        "tgi_batch_current_max_tokens",
    ):
        assert f"\n{name}" in text, name
    assert _metric(server, "tgi_request_success") >= 1


def test_decoder_input_details_returns_prompt_logprobs(server, bundled_model_dir):
    import torch
    from transformers import AutoModelForCausalLM

    prompt = "The capital of France is Paris, and the capital of Italy is"
    r = post(
        server, "/generate", {"inputs": prompt, "parameters": {"max_new_tokens": 2, "decoder_input_details": True}}
    )
    prefill = r.json()["details"]["prefill"]
    ids = [t["id"] for t in prefill]
    assert prefill[0]["logprob"] is None and set(prefill[0]) == {"id", "text", "logprob"}
    model = AutoModelForCausalLM.from_pretrained(bundled_model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        logprobs = model(torch.tensor([ids])).logits[0].log_softmax(-1)
    expected = logprobs[:-1].gather(-1, torch.tensor(ids[1:])[:, None]).squeeze(-1)
    torch.testing.assert_close(torch.tensor([t["logprob"] for t in prefill[1:]]), expected, atol=1e-3, rtol=0)
    # Asked twice: the second request must not take its prompt from the prefix cache.
    again = post(
        server, "/generate", {"inputs": prompt, "parameters": {"max_new_tokens": 2, "decoder_input_details": True}}
    )
    assert again.json()["details"]["prefill"] == prefill
