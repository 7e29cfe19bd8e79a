"""Security: owner-only shard sockets, loopback-only TCP shards, no request content in the logs,
and input limits enforced before any costly work. (The API key on every route: test_overload.py.)"""

import ipaddress
import json
import os
import socket
import stat
import sys
import time
import uuid
from pathlib import Path

import pytest
import requests

from tests.e2e.server import free_port
from tests.reliability.conftest import spawn, stop_process, wait_for

BIG = "hello world " * 158_000  # 1.9 MB: under the 2 MB payload limit, far over any token limit


def test_shard_sockets_are_owner_only(rel_server):
    sockets = sorted(Path(rel_server.tmp.name).glob("shard-*"))
    assert sockets, list(Path(rel_server.tmp.name).iterdir())
    for path in sockets:
        mode = os.stat(path).st_mode
        assert stat.S_ISSOCK(mode) and mode & 0o177 == 0, f"{path}: {oct(mode & 0o777)}"


def test_tcp_shard_binds_loopback_only(bundled_model_dir, tmp_path):
    """`--port` without `--host` listens on 127.0.0.1, never on every interface."""
    port = free_port()
    log = tmp_path / "shard.log"
    argv = [sys.executable, "-m", "shard", "--model-id", str(bundled_model_dir), "--port", str(port)]
    shard = spawn([*argv, "--cpu-kv-cache-gb", "0.1"], log)
    try:
        wait_for("the shard", lambda: "serving on" in log.read_text(), shard, log)
        listening = _listening_addresses(port)
        assert listening and all(_is_loopback(a) for a in listening), listening
    finally:
        stop_process(shard)


def _is_loopback(address: str) -> bool:
    ip = ipaddress.ip_address(address)
    mapped = getattr(ip, "ipv4_mapped", None)  # gRPC listens on [::ffff:127.0.0.1] for 127.0.0.1
    return ip.is_loopback or (mapped is not None and mapped.is_loopback)


def _listening_addresses(port: int) -> set[str]:
    """Local addresses in LISTEN state on `port`, from /proc/net/tcp and tcp6."""
    out = set()
    for table, family in (("/proc/net/tcp", socket.AF_INET), ("/proc/net/tcp6", socket.AF_INET6)):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            address, hex_port = fields[1].split(":")
            if fields[3] != "0A" or int(hex_port, 16) != port:  # 0A: LISTEN
                continue
            raw = bytes.fromhex(address)  # 32-bit words in host (little-endian) order
            out.add(socket.inet_ntop(family, b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))))
    return out


def test_request_content_never_reaches_the_logs(rel_server):
    marker = f"zq{uuid.uuid4().hex}"
    auth = {"Authorization": f"Bearer key-{marker}"}
    requests_sent = [
        ("/generate", {"inputs": f"Say {marker}", "parameters": {"max_new_tokens": 2, "stop": [marker]}}),
        ("/generate_stream", {"inputs": f"Say {marker}", "parameters": {"max_new_tokens": 2}}),
        ("/", {"inputs": f"Say {marker}", "parameters": {"max_new_tokens": 2}}),
        ("/tokenize", {"inputs": f"Say {marker}"}),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": f"Say {marker}"}], "max_tokens": 2}),
        ("/v1/completions", {"prompt": f"Say {marker}", "max_tokens": 2, "user": marker}),
        # Refused ones, on every path that ends in an error.
        ("/generate", {"inputs": f"Say {marker}", "parameters": {"max_new_tokens": 2, "temperature": 0}}),
        ("/generate", {"inputs": f"Say {marker}", "parameters": {"max_new_tokens": 9999}}),
        ("/v1/chat/completions", {"messages": [{"role": marker, "content": marker}], "tool_choice": marker}),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": marker}]}]}),
        ("/v1/completions", {"prompt": marker, "suffix": marker}),
    ]
    for path, body in requests_sent:
        assert requests.post(rel_server.url + path, json=body, headers=auth, timeout=60).status_code < 500
    malformed = f'{{"inputs": "{marker}", "parameters": {{'.encode()
    headers = {**auth, "Content-Type": "application/json"}
    assert requests.post(rel_server.url + "/generate", data=malformed, headers=headers, timeout=10).status_code == 400
    time.sleep(0.5)  # let the processes flush their logs
    log = rel_server.log_path.read_text()
    assert marker not in log, [line for line in log.splitlines() if marker in line][:5]


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/generate", {"inputs": BIG, "parameters": {"max_new_tokens": 2}}),
        ("/generate_stream", {"inputs": BIG, "parameters": {"max_new_tokens": 2}}),
        ("/", {"inputs": BIG, "parameters": {"max_new_tokens": 2}}),
        ("/tokenize", {"inputs": BIG}),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": BIG}], "max_tokens": 2}),
        ("/v1/completions", {"prompt": BIG, "max_tokens": 2}),
        ("/v1/completions", {"prompt": [0] * 600_000, "max_tokens": 2}),
    ],
)
def test_huge_inputs_are_refused_before_tokenization(rel_server, path, body):
    """Tokenizing 1.9 MB takes about a second here: the text is refused by its length alone, before
    the tokenizer runs, which the message says ("more than that" rather than a token count)."""
    data = json.dumps(body, separators=(",", ":")).encode()
    assert len(data) > 1_000_000
    r = requests.post(rel_server.url + path, data=data, headers={"Content-Type": "application/json"}, timeout=30)
    assert r.status_code == 422, r.text[:300]
    given = "600000" if isinstance(body.get("prompt"), list) else "more than that"  # token ids: counted, not tokenized
    assert r.json()["error"] == f"Input validation error: `inputs` must have less than 896 tokens. Given: {given}"


def test_payload_limit(rel_server):
    json_type = {"Content-Type": "application/json"}
    r = requests.post(rel_server.url + "/generate", data=b"x" * 2_100_000, headers=json_type, timeout=30)
    assert r.status_code == 413 and r.json()["error_type"] == "payload_too_large"


def _error(url: str, path: str, body: dict) -> str | None:
    r = requests.post(url + path, json=body, timeout=60)
    if r.status_code == 200:
        return None
    assert r.status_code == 422, r.text
    return r.json()["error"]


def test_configured_limits_are_enforced(rel_server):
    url = rel_server.url
    info = requests.get(url + "/info", timeout=10).json()
    assert (info["max_stop_sequences"], info["max_best_of"], info["max_total_tokens"]) == (2, 3, 1024)
    tgi = {"inputs": "Hello", "parameters": {"max_new_tokens": 2}}

    def with_params(**params) -> dict:
        return {**tgi, "parameters": {**tgi["parameters"], **params}}

    # --max-stop-sequences 2
    assert _error(url, "/generate", with_params(stop=["a", "b"])) is None
    assert _error(url, "/generate", with_params(stop=["a", "b", "c"])) == (
        "Input validation error: `stop` supports up to 2 stop sequences. Given: 3"
    )
    chat = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
    assert "up to 2 stop sequences" in _error(url, "/v1/chat/completions", {**chat, "stop": ["a", "b", "c"]})
    # --max-top-n-tokens 3
    assert _error(url, "/generate", with_params(top_n_tokens=3, details=True)) is None
    assert _error(url, "/generate", with_params(top_n_tokens=4)) == (
        "Input validation error: `top_n_tokens` must be >= 0 and <= 3. Given: 4"
    )
    assert "<= 3" in _error(url, "/v1/chat/completions", {**chat, "logprobs": True, "top_logprobs": 4})
    assert "<= 3" in _error(url, "/v1/completions", {"prompt": "Hi", "max_tokens": 2, "logprobs": 4})
    # --max-best-of 3
    assert _error(url, "/generate", with_params(best_of=3, do_sample=True)) is None
    assert _error(url, "/generate", with_params(best_of=4, do_sample=True)) == (
        "Input validation error: `best_of` must be > 0 and <= 3. Given: 4"
    )
    # --max-total-tokens 1024 / --max-input-tokens 896
    assert "must be <= 1024" in _error(url, "/generate", with_params(max_new_tokens=1024))
    assert "less than 896 tokens" in _error(url, "/generate", {"inputs": "hi " * 950, "parameters": {}})
