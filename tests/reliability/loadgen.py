"""A mixed, bounded load for the soak and overload tests: every request ends in exactly one outcome.

Outcomes: `complete` (a whole response or stream), `rejected` (the 4xx it was meant to get),
`cancelled` (the client hung up on purpose), `overloaded` (429); anything else is a failure:
`error_status`, `error_event`, `bad_response`, `exception` and `hung` (over the per-request timeout).
"""

import asyncio
import json
import random
import time
from dataclasses import dataclass, field

import aiohttp

EXPECTED = {"complete", "rejected", "cancelled"}
COUNTING = "1, 2, 3, 4, 5, 6, 7, 8,"  # this model counts on until the length limit
PROMPTS = [
    "Hello",
    "The capital of France is",
    COUNTING,
    "<|im_start|>user\nWrite a haiku about rivers.<|im_end|>\n<|im_start|>assistant\n",
    "Once upon a time, " * 20,
    "def fibonacci(n):\n    " * 40,  # a few hundred tokens: chunked prefill and prefix sharing
    "日本語のテキストと絵文字 🌊🌊 " * 10,
]


@dataclass
class Job:
    kind: str
    path: str
    body: object
    stream: bool = False
    expect: str = "complete"  # or "rejected" / "cancelled"
    cancel_after: int = 0  # cancelled streams: events read before hanging up; non-streams: seconds * 10

    @property
    def deterministic(self) -> bool:
        """Whether the text generated is a function of the request alone (greedy, or sampled with a seed),
        so that any undisturbed run gives the same."""
        return self.expect == "complete" and self.kind in {"tgi", "tgi_long", "tgi_stream", "compat", "chat"}

    @property
    def sequences(self) -> int:
        """Sequences the server generates for the job when it completes (best_of, prompts x n)."""
        body = self.body if isinstance(self.body, dict) else {}
        if self.kind == "best_of":
            return body["parameters"]["best_of"]
        if self.kind == "completions":
            prompt = body["prompt"]
            prompts = len(prompt) if isinstance(prompt, list) and isinstance(prompt[0], str) else 1
            return prompts * body.get("n", 1)
        return 1


@dataclass
class Outcome:
    kind: str
    outcome: str
    status: int = 0
    detail: str = ""
    seconds: float = 0.0
    sequences: int = 1  # the job's, for a completed one
    text: str = ""  # what a completed job generated (its choices' texts joined by "|")
    index: int = -1  # the job's position in the list given to run_load


def make_jobs(n: int, seed: int) -> list[Job]:
    """`n` jobs of a fixed mix: TGI and OpenAI routes, streamed or not, short and long, cancelled, invalid."""
    rng = random.Random(seed)
    jobs = []
    for _ in range(n):
        roll = rng.random()
        prompt = rng.choice(PROMPTS)
        short, long = rng.randint(1, 8), rng.randint(40, 96)
        if roll < 0.14:
            jobs.append(Job("tgi", "/generate", {"inputs": prompt, "parameters": {"max_new_tokens": short}}))
        elif roll < 0.22:
            params = {"max_new_tokens": long, "details": True, "top_n_tokens": 2}
            jobs.append(Job("tgi_long", "/generate", {"inputs": COUNTING, "parameters": params}))
        elif roll < 0.36:
            max_new = rng.choice([short, long])
            params = {"max_new_tokens": max_new, "details": True, "do_sample": True, "seed": rng.randrange(2**32)}
            jobs.append(Job("tgi_stream", "/generate_stream", {"inputs": prompt, "parameters": params}, stream=True))
        elif roll < 0.42:
            body = {"inputs": prompt, "stream": rng.random() < 0.5, "parameters": {"max_new_tokens": short}}
            jobs.append(Job("compat", "/", body, stream=body["stream"]))
        elif roll < 0.47:
            params = {"max_new_tokens": short, "best_of": 2, "do_sample": True, "details": True}
            jobs.append(Job("best_of", "/generate", {"inputs": prompt, "parameters": params}))
        elif roll < 0.60:
            stream = rng.random() < 0.5
            body = {
                "messages": [{"role": "user", "content": prompt}],
                "max_tokens": rng.choice([short, long]),
                "temperature": rng.choice([0, 0.7]),
                "seed": rng.randrange(2**32),
                "stream": stream,
                "stream_options": {"include_usage": True} if stream else None,
                "logprobs": True,
                "top_logprobs": 1,
            }
            jobs.append(Job("chat", "/v1/chat/completions", body, stream=stream))
        elif roll < 0.70:
            stream = rng.random() < 0.5
            body = {
                "prompt": rng.choice([prompt, [prompt, "Hi"], [1, 2, 3, 4]]),
                "max_tokens": short,
                "n": rng.choice([1, 2]),
                "stop": ["\n\n"],
                "stream": stream,
            }
            jobs.append(Job("completions", "/v1/completions", body, stream=stream))
        elif roll < 0.82:
            k = rng.randint(1, 4)
            if rng.random() < 0.5:
                body = {"inputs": COUNTING, "parameters": {"max_new_tokens": 200}}
                jobs.append(
                    Job("cancel_tgi", "/generate_stream", body, stream=True, expect="cancelled", cancel_after=k)
                )
            else:
                body = {"messages": [{"role": "user", "content": COUNTING}], "max_tokens": 200, "stream": True}
                jobs.append(Job("cancel_chat", "/v1/chat/completions", body, True, "cancelled", cancel_after=k))
        elif roll < 0.86:  # a non-stream request whose client gives up after a few tenths of a second
            body = {"inputs": COUNTING, "parameters": {"max_new_tokens": 200}}
            jobs.append(Job("abandon", "/generate", body, expect="cancelled", cancel_after=rng.randint(1, 5)))
        elif roll < 0.94:
            body = rng.choice(
                [
                    {"inputs": prompt, "parameters": {"max_new_tokens": 4, "temperature": 0}},
                    {"inputs": "", "parameters": {"max_new_tokens": 4}},
                    {"inputs": prompt, "parameters": {"max_new_tokens": 5000}},
                    {"inputs": prompt, "parameters": {"max_new_tokens": 4, "stop": ["a", "b", "c"]}},
                ]
            )
            path = rng.choice(["/generate", "/generate_stream", "/"])
            jobs.append(Job("invalid", path, body, expect="rejected"))
        elif roll < 0.97:
            body = rng.choice([{"messages": [], "max_tokens": 4}, {"prompt": [], "max_tokens": 4}])
            path = "/v1/chat/completions" if "messages" in body else "/v1/completions"
            jobs.append(Job("invalid_openai", path, body, expect="rejected"))
        else:
            jobs.append(
                Job("malformed", rng.choice(["/generate", "/v1/completions"]), b'{"inputs": ', expect="rejected")
            )
    return jobs


async def _run(session: aiohttp.ClientSession, url: str, job: Job, headers: dict[str, str]) -> Outcome:
    data = job.body if isinstance(job.body, bytes) else json.dumps(job.body).encode()
    headers = {"Content-Type": "application/json", **headers}
    if job.kind == "abandon":
        try:
            async with asyncio.timeout(job.cancel_after / 10):
                async with session.post(url + job.path, data=data, headers=headers) as r:
                    await r.read()
                    return Outcome(job.kind, "bad_response", r.status, "finished before the client gave up")
        except TimeoutError:
            return Outcome(job.kind, "cancelled")
    async with session.post(url + job.path, data=data, headers=headers) as r:
        if r.status == 429:
            await r.read()
            return Outcome(job.kind, "overloaded", 429)
        if r.status != 200:
            body = await r.text()
            ok = job.expect == "rejected" and 400 <= r.status < 500
            try:
                ok = ok and set(json.loads(body)) == {"error", "error_type"}
            except ValueError:
                ok = False
            return Outcome(job.kind, "rejected" if ok else "error_status", r.status, body[:200])
        if job.expect == "rejected":
            await r.read()
            return Outcome(job.kind, "bad_response", r.status, "a request meant to be invalid succeeded")
        if not r.headers.get("Content-Type", "").startswith("text/event-stream"):
            body = await r.json()
            body = body[0] if isinstance(body, list) else body
            text_ok = "generated_text" in body or "choices" in body
            outcome = Outcome(job.kind, "complete" if text_ok else "bad_response", 200, str(body)[:200])
            outcome.text = _body_text(body) if text_ok else ""
            return outcome
        events = []
        texts: dict[int, str] = {}  # by choice index
        async for line in r.content:
            line = line.decode().strip()
            if not line.startswith("data:"):
                continue
            payload = line[5:].strip()
            if payload == "[DONE]":
                outcome = Outcome(job.kind, "complete" if events else "bad_response", 200)
                outcome.text = "|".join(texts[i] for i in sorted(texts))
                return outcome
            event = json.loads(payload)
            if "error" in event:
                return Outcome(job.kind, "error_event", 200, str(event)[:200])
            events.append(event)
            for choice in event.get("choices", []):
                delta = choice.get("text") or (choice.get("delta") or {}).get("content") or ""
                texts[choice["index"]] = texts.get(choice["index"], "") + delta
            if job.expect == "cancelled" and len(events) >= job.cancel_after:
                r.close()  # hang up mid-stream
                return Outcome(job.kind, "cancelled", 200)
            if event.get("generated_text") is not None and job.path != "/v1/completions":
                return Outcome(job.kind, "complete", 200, text=event["generated_text"])
        return Outcome(job.kind, "bad_response", 200, f"the stream ended after {len(events)} events without its end")


def _body_text(body: dict) -> str:
    """The text of a non-stream response: TGI's generated_text, or the OpenAI choices' texts joined by "|"."""
    if "generated_text" in body:
        return body["generated_text"]
    choices = sorted(body["choices"], key=lambda c: c["index"])
    return "|".join(c["text"] if "text" in c else c["message"]["content"] or "" for c in choices)


@dataclass
class Report:
    outcomes: list[Outcome] = field(default_factory=list)
    seconds: float = 0.0

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for o in self.outcomes:
            out[o.outcome] = out.get(o.outcome, 0) + 1
        return dict(sorted(out.items()))

    def failures(self, allowed=EXPECTED) -> list[Outcome]:
        return [o for o in self.outcomes if o.outcome not in allowed]

    def texts(self) -> dict[int, str]:
        """The text of each completed job, by its index."""
        return {o.index: o.text for o in self.outcomes if o.outcome == "complete"}


async def run_load(
    url: str,
    jobs: list[Job],
    concurrency: int,
    timeout_s: float,
    headers: dict[str, str] | None = None,
) -> Report:
    """Run `jobs` with at most `concurrency` in flight; each one ends in exactly one outcome."""
    semaphore = asyncio.Semaphore(concurrency)
    report = Report()
    start = time.monotonic()

    async def one(session, index, job):
        async with semaphore:
            t = time.monotonic()
            try:
                outcome = await asyncio.wait_for(_run(session, url, job, headers or {}), timeout_s)
            except TimeoutError:
                outcome = Outcome(job.kind, "hung", detail=f"no end after {timeout_s:g}s")
            except Exception as e:  # noqa: BLE001 - every failure is an outcome, counted and reported
                outcome = Outcome(job.kind, "exception", detail=f"{type(e).__name__}: {e}"[:200])
            outcome.seconds, outcome.sequences, outcome.index = time.monotonic() - t, job.sequences, index
            report.outcomes.append(outcome)

    connector = aiohttp.TCPConnector(limit=concurrency + 4)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=None)) as session:
        await asyncio.gather(*(one(session, i, job) for i, job in enumerate(jobs)))
    report.seconds = time.monotonic() - start
    return report
