"""Clients for fault tests: one request on a TGI or OpenAI route, streamed or not, and how it ended."""

import json
import threading
import time
from dataclasses import dataclass

import requests

COUNTING = "1, 2, 3, 4, 5, 6, 7, 8,"  # the bundled model counts on until the length limit

ROUTES = {  # kind: (path, streamed)
    "generate": ("/generate", False),
    "generate_stream": ("/generate_stream", True),
    "completions": ("/v1/completions", False),
    "completions_stream": ("/v1/completions", True),
    "chat": ("/v1/chat/completions", False),
    "chat_stream": ("/v1/chat/completions", True),
}


def body(kind: str, prompt: str = COUNTING, max_new_tokens: int = 400, **sampling) -> dict:
    """A greedy request (unless `sampling` says otherwise) that ignores EOS, for route `kind`."""
    path, stream = ROUTES[kind]
    if path.startswith("/generate"):
        return {"inputs": prompt, "parameters": {"max_new_tokens": max_new_tokens, **sampling}}
    base = {"max_tokens": max_new_tokens, "ignore_eos": True, "temperature": 0, "stream": stream, **sampling}
    if kind.startswith("chat"):
        return {"messages": [{"role": "user", "content": prompt}], **base}
    return {"prompt": prompt, **base}


@dataclass
class Ending:
    """How a request ended: `how` is "complete", "error event", "status N", "closed" (the stream ended
    without its end) or "exception Name"; `error` the error event or body; `at` time.monotonic()."""

    how: str
    text: str = ""
    events: int = 0
    error: object = None
    at: float = 0.0

    def __post_init__(self):
        self.at = time.monotonic()

    @property
    def is_tgi_error(self) -> bool:
        """TGI's error shape with the generation error type (an event, or a 424 body)."""
        e = self.error
        return isinstance(e, dict) and isinstance(e.get("error"), str) and e.get("error_type") == "generation"

    @property
    def is_openai_error(self) -> bool:
        """The OpenAI routes' error event: {"error": {"message", "http_status_code": 424}}."""
        e = self.error.get("error") if isinstance(self.error, dict) else None
        return isinstance(e, dict) and isinstance(e.get("message"), str) and e.get("http_status_code") == 424


def run(url: str, kind: str, request: dict, started: threading.Event | None = None, timeout_s: float = 300) -> Ending:
    """Send `request` on route `kind`; `started` is set once a stream has its first event."""
    path, stream = ROUTES[kind]
    try:
        if not stream:
            r = requests.post(url + path, json=request, timeout=timeout_s)
            if r.status_code != 200:
                return Ending(f"status {r.status_code}", error=_json(r.text))
            return Ending("complete", text=_text(r.json()))
        with requests.post(url + path, json=request, stream=True, timeout=timeout_s) as r:
            return _read_stream(r, started)
    except requests.RequestException as e:
        return Ending(f"exception {type(e).__name__}")


def _read_stream(r: requests.Response, started: threading.Event | None) -> Ending:
    text, events = "", 0
    for line in r.iter_lines(decode_unicode=True):
        if not line.startswith("data:"):
            continue
        payload = line[5:].strip()
        if payload == "[DONE]":
            return Ending("complete", text, events)
        event = json.loads(payload)
        if "error" in event:
            return Ending("error event", text, events, event)
        events += 1
        if started is not None:
            started.set()
        if "token" in event:  # TGI
            if event.get("generated_text") is not None:
                return Ending("complete", event["generated_text"], events)
            continue
        for choice in event.get("choices", []):
            text += choice.get("text") or (choice.get("delta") or {}).get("content") or ""
    return Ending("closed", text, events)


def _text(response: object) -> str:
    body = response[0] if isinstance(response, list) else response
    if "generated_text" in body:
        return body["generated_text"]
    choice = body["choices"][0]
    return choice.get("text") if "text" in choice else choice["message"]["content"]


def _json(text: str) -> object:
    try:
        return json.loads(text)
    except ValueError:
        return text
