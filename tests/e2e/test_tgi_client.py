"""TGI's own Python client against Sluice, and the server's access controls."""

import asyncio
import concurrent.futures

import pytest
import requests
from text_generation import AsyncClient, Client
from text_generation.errors import OverloadedError, ValidationError, parse_error

from tests.e2e.server import EAGER, LauncherProcess


def test_client_generate_with_details_top_tokens_and_stop(server):
    client = Client(server.url, timeout=120)
    r = client.generate("1, 2, 3, 4, 5,", max_new_tokens=20, top_n_tokens=2, stop_sequences=[" 8"])
    assert r.details.finish_reason.value == "stop_sequence" and r.generated_text.endswith(" 8")
    assert r.details.generated_tokens == len(r.details.tokens) == len(r.details.top_tokens)
    assert all(len(t) == 2 for t in r.details.top_tokens)


def test_client_stream_equals_generate(server):
    client = Client(server.url, timeout=120)
    full = client.generate("The capital of France is", max_new_tokens=12)
    tokens = list(client.generate_stream("The capital of France is", max_new_tokens=12))
    assert "".join(t.token.text for t in tokens if not t.token.special) == tokens[-1].generated_text
    assert tokens[-1].generated_text == full.generated_text


def test_async_client_seeded_sampling_and_best_of(server):
    async def run():
        client = AsyncClient(server.url, timeout=120)
        a = await client.generate("Once upon a time", do_sample=True, seed=7, max_new_tokens=10, temperature=0.8)
        b = await client.generate("Once upon a time", do_sample=True, seed=7, max_new_tokens=10, temperature=0.8)
        best = await client.generate("Once upon a time", do_sample=True, best_of=2, max_new_tokens=6)
        stream = [t async for t in client.generate_stream("Once upon a time", max_new_tokens=4)]
        return a, b, best, stream

    a, b, best, stream = asyncio.run(run())
    assert a.generated_text == b.generated_text and a.details.seed == 7
    (other,) = best.details.best_of_sequences
    mean = lambda tokens: sum(t.logprob for t in tokens) / len(tokens)  # noqa: E731
    assert mean(best.details.tokens) >= mean(other.tokens)
    assert best.details.seed != other.seed
    assert stream[-1].details.generated_tokens == 4


def test_the_servers_validation_error_reaches_the_client_as_one(server):
    """The client validates top_k itself before sending, so the body goes out raw; the server's
    answer then goes through the client's own error mapping."""
    r = requests.post(server.url + "/generate", json={"inputs": "Hi", "parameters": {"top_k": -1}}, timeout=30)
    assert r.status_code == 422
    error = parse_error(r.status_code, r.json())
    assert (
        isinstance(error, ValidationError) and str(error) == "Input validation error: `top_k` must be strictly positive"
    )


def test_tokenize_returns_byte_offsets(server):
    text = "Hé 🌊 ok"
    tokens = requests.post(server.url + "/tokenize", json={"inputs": text}, timeout=10).json()
    raw = text.encode()
    assert [t["text"] for t in tokens][:2] == ["H", "é"]  # one piece per token, multi-byte ones too
    assert all(raw[t["start"] : t["stop"]].decode() == t["text"] for t in tokens)
    assert [t["start"] for t in tokens] == sorted(t["start"] for t in tokens) and tokens[-1]["stop"] == len(raw)


@pytest.fixture(scope="module")
def guarded_server(bundled_model_dir):
    """API key (from the environment, as in a pod), one origin allowed, one request at a time."""
    args = ["--cors-allow-origin", "https://app.example", "--max-concurrent-requests", "1"]
    with LauncherProcess(bundled_model_dir, *args, *EAGER, env={"API_KEY": "s3cret"}) as launcher:
        yield launcher


@pytest.mark.parametrize(("header", "status"), [(None, 401), ("Bearer wrong", 401), ("Bearer s3cret", 200)])
def test_api_key_is_required_on_generation_routes(guarded_server, header, status):
    headers = {"Authorization": header} if header else {}
    body = {"inputs": "Hi", "parameters": {"max_new_tokens": 1}}
    for path in ("/generate", "/generate_stream", "/tokenize"):
        assert requests.post(guarded_server.url + path, json=body, headers=headers, timeout=30).status_code == status
    assert requests.get(guarded_server.url + "/health", timeout=10).status_code == 200  # info routes stay open


def test_api_key_never_reaches_argv_or_logs(guarded_server):
    assert "s3cret" not in guarded_server.log()
    for pid in filter(str.isdigit, __import__("os").listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmdline = f.read()
        except OSError:
            continue
        if guarded_server.tmp.name.encode() in cmdline:
            assert b"s3cret" not in cmdline


def test_cors_allows_only_the_configured_origin(guarded_server):
    preflight = {"Origin": "https://app.example", "Access-Control-Request-Method": "POST"}
    r = requests.options(guarded_server.url + "/generate", headers=preflight, timeout=10)
    assert r.status_code == 204 and r.headers["Access-Control-Allow-Origin"] == "https://app.example"
    r = requests.options(guarded_server.url + "/generate", headers={**preflight, "Origin": "https://evil"}, timeout=10)
    assert r.status_code == 403 and "Access-Control-Allow-Origin" not in r.headers
    r = requests.get(guarded_server.url + "/info", headers={"Origin": "https://app.example"}, timeout=10)
    assert r.headers["Access-Control-Allow-Origin"] == "https://app.example"


def test_over_the_concurrency_limit_the_client_gets_overloaded(guarded_server):
    client = Client(guarded_server.url, headers={"Authorization": "Bearer s3cret"}, timeout=120)
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        futures = [pool.submit(client.generate, "1, 2, 3,", max_new_tokens=40) for _ in range(6)]
        outcomes = []
        for f in futures:
            try:
                outcomes.append(f.result().details.generated_tokens)
            except OverloadedError:
                outcomes.append("429")
    assert "429" in outcomes and 40 in outcomes  # refused at once, and the admitted one completed
