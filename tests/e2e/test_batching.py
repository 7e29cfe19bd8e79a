"""Continuous batching end to end: prefix sharing, chunked prefill, preemption under pressure."""

import concurrent.futures
import json
import threading
import time

import pytest
import requests

from router.tokenizer import Tokenizer
from tests.e2e.server import EAGER, LauncherProcess

SYSTEM = "You are a meticulous assistant for a river-shipping company. " + " ".join(
    f"Rule {i}: always report the cargo, the port of origin and the expected arrival day." for i in range(14)
)


def metric(url: str, name: str) -> float:
    for line in requests.get(url + "/metrics", timeout=10).text.splitlines():
        if line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    raise KeyError(name)


def generate(url: str, prompt: str, max_new_tokens: int) -> list[int]:
    r = requests.post(
        url + "/generate",
        json={"inputs": prompt, "parameters": {"max_new_tokens": max_new_tokens, "details": True}},
        timeout=600,
    )
    assert r.status_code == 200, r.text
    return [t["id"] for t in r.json()["details"]["tokens"]]


def chat(system: str, user: str) -> str:
    return f"<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"


def test_a_shared_system_prompt_is_computed_once(server, tight_server, bundled_model_dir):
    """32 requests sharing a 200-token system prompt compute it once, and what they generate
    from the cached prefix is what a server without prefix caching generates."""
    tokenizer = Tokenizer(bundled_model_dir)
    prompts = [chat(SYSTEM, f"Question {i}: where is barge {i} going?") for i in range(32)]
    lengths = [len(tokenizer.encode(p)) for p in prompts]
    shared = len(tokenizer.encode(chat(SYSTEM, "")).copy()) - 6  # the system part and the user header
    assert shared >= 200
    before = metric(server.url, "sluice_prompt_tokens_computed")
    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        cached = list(pool.map(lambda p: generate(server.url, p, 8), prompts))
    computed = metric(server.url, "sluice_prompt_tokens_computed") - before
    # Without sharing: sum(lengths) (> 32 * 200). With it: the prefix once, plus each request's
    # own tokens from the last fully shared block on (at most one block of 16 more each).
    assert computed <= shared + sum(n - shared for n in lengths) + 32 * 16
    assert computed < sum(lengths) / 4
    uncached = [generate(tight_server.url, p, 8) for p in prompts[:8]]
    assert cached[:8] == uncached


@pytest.fixture(scope="module")
def tight_server(bundled_model_dir):
    """A small prefill budget and a KV pool of 40 blocks (640 tokens); float32, as `server`, whose
    outputs the preempted ones are compared with; eager, as it tests the scheduler."""
    args = ["--dtype", "float32", "--max-batch-prefill-tokens", "64", "--max-batch-total-tokens", "640",
            "--max-total-tokens", "512", "--max-input-tokens", "400", "--prefix-caching", "false"]  # fmt: skip
    with LauncherProcess(bundled_model_dir, *EAGER, *args) as launcher:
        yield launcher


def test_a_long_prompt_is_chunked_while_other_streams_keep_producing(tight_server):
    arrivals: list[float] = []
    started = threading.Event()

    def stream():
        body = {"inputs": "1, 2, 3, 4, 5, 6, 7, 8,", "parameters": {"max_new_tokens": 150}}
        with requests.post(tight_server.url + "/generate_stream", json=body, stream=True, timeout=300) as r:
            for line in r.iter_lines():
                if line.startswith(b"data:"):
                    arrivals.append(time.monotonic())
                    started.set()

    runner = threading.Thread(target=stream)
    runner.start()
    started.wait(60)
    long_prompt = " ".join(f"word{i}" for i in range(120))  # about 3x the 64-token budget
    sent = time.monotonic()
    r = requests.post(tight_server.url + "/generate_stream", json={"inputs": long_prompt, "parameters": {
        "max_new_tokens": 1, "details": True}}, stream=True, timeout=300)  # fmt: skip
    events = [json.loads(line[5:]) for line in r.iter_lines() if line.startswith(b"data:")]
    first_token = time.monotonic()
    runner.join()
    assert events[-1]["details"]["input_length"] >= 3 * 64
    during = [t for t in arrivals if sent <= t <= first_token]
    assert len(during) >= 3, "the running stream stalled while the long prompt was computed"


def test_a_small_kv_pool_completes_32_requests_through_preemption(tight_server, server):
    """32 requests of ~50 tokens need ~128 blocks of the 40: they complete, preempted and resumed,
    with the tokens an ample pool gives."""
    prompts = [f"{i}, {i + 1}, {i + 2}," for i in range(32)]
    before = metric(tight_server.url, "sluice_preemptions")
    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        expected = list(pool.map(lambda p: generate(server.url, p, 40), prompts))  # ample memory
        outputs = list(pool.map(lambda p: generate(tight_server.url, p, 40), prompts))
    assert all(len(o) == 40 for o in outputs)
    assert outputs == expected
    assert metric(tight_server.url, "sluice_preemptions") > before
    assert metric(tight_server.url, "sluice_kv_blocks_free") == 40


def test_inputs_longer_than_max_input_tokens_are_refused(tight_server):
    prompt = " ".join(f"w{i}" for i in range(130))  # 410 tokens: over 400, yet 10 more fit in 512
    r = requests.post(tight_server.url + "/generate", json={"inputs": prompt, "parameters": {"max_new_tokens": 10}},
                      timeout=30)  # fmt: skip
    assert r.status_code == 422 and r.json()["error_type"] == "validation"
    assert r.json()["error"].startswith("Input validation error: `inputs` must have less than 400 tokens. Given: ")
