"""Load generator: drive a running server over HTTP and record what each request saw.

Two APIs, both streamed (SSE), both greedy:
- `openai` (default): `POST /v1/completions` with the prompt as token ids, `ignore_eos` and
  `min_tokens` so every request produces exactly `max_tokens`, and `stream_options.include_usage`
  so the token count comes from the server's usage chunk.
- `tgi`: `POST /generate_stream` with the prompt text (which re-tokenizes to the same ids, see
  workload.py). TGI has no public `ignore_eos`: a request may stop early at EOS, and the counts
  are the events received.

Arrivals: a closed loop of `concurrency` clients (each sends its next request when the previous
one finished; vLLM's `--max-concurrency` with rate inf), or a Poisson process at `rate` requests/s
(optionally also capped by `concurrency`). Usage: `python -m benchmarks.loadgen --help`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import time
from pathlib import Path

import aiohttp

from benchmarks.metrics import RequestRecord, summarize
from benchmarks.workload import RequestSpec, make_requests, nano_vllm_requests, poisson_arrivals

APIS = ("openai", "tgi")


def request_body(api: str, spec: RequestSpec) -> tuple[str, dict]:
    """(path, JSON body) of one request."""
    if api == "openai":
        return "/v1/completions", {
            "prompt": list(spec.prompt_ids),
            "max_tokens": spec.max_tokens,
            "min_tokens": spec.max_tokens,
            "ignore_eos": True,
            "temperature": 0,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
    if api == "tgi":
        params = {"max_new_tokens": spec.max_tokens, "do_sample": False, "details": True}
        return "/generate_stream", {"inputs": spec.prompt_text, "parameters": params}
    raise ValueError(f"unknown api {api!r}; expected one of {APIS}")


def _apply_event(api: str, event: dict, record: RequestRecord, now: float) -> None:
    """Record one SSE event: a token (its arrival time), the usage, or an error; and the text where the
    record keeps it (`record.text` not None; OpenAI API only)."""
    if "error" in event:
        record.error = json.dumps(event["error"])
    elif api == "openai":
        if event.get("choices"):
            record.token_s.append(now)
            if record.text is not None:  # a completion's `text`, a chat chunk's `delta.content`
                choice = event["choices"][0]
                record.text += choice.get("text") or (choice.get("delta") or {}).get("content") or ""
        if event.get("usage"):
            record.output_tokens = event["usage"]["completion_tokens"]
    elif "token" in event:
        record.token_s.append(now)


async def send_one(
    session: aiohttp.ClientSession,
    url: str,
    api: str,
    spec: RequestSpec,
    t0: float,
    record: RequestRecord | None = None,
    extra: dict | None = None,
    keep_text: bool = False,
) -> RequestRecord:
    """Send `spec` now and stream its answer into a record (times relative to `t0`).

    Pass `record` to watch the tokens arrive while the request streams (its `send_s` is set here).
    `extra`: more body fields (e.g. `response_format`); `keep_text`: the record keeps the generated text.
    """
    path, body = request_body(api, spec)
    body |= extra or {}
    if record is None:
        record = RequestRecord(spec.index, spec.prompt_len, 0.0)
    if keep_text:
        record.text = ""
    record.send_s = time.perf_counter() - t0
    try:
        async with session.post(url + path, json=body) as resp:
            if resp.status != 200:
                record.error = f"HTTP {resp.status}: {(await resp.text())[:300]}"
                return record
            async for line in resp.content:
                if not line.startswith(b"data:"):
                    continue
                now = time.perf_counter() - t0
                data = line[5:].strip()
                if data == b"[DONE]":
                    break
                _apply_event(api, json.loads(data), record, now)
    except (TimeoutError, aiohttp.ClientError) as e:
        record.error = f"{type(e).__name__}: {e}"
    if record.error is None and not record.token_s:
        record.error = "no token received"
    return record


async def run_load(
    url: str,
    specs: list[RequestSpec],
    api: str = "openai",
    concurrency: int | None = None,
    rate: float = float("inf"),
    seed: int = 0,
    extra: dict | None = None,
    keep_text: bool = False,
) -> tuple[list[RequestRecord], float]:
    """Send every request of `specs` (closed loop of `concurrency` clients and/or Poisson at `rate`).

    Returns the records in request order and the run's duration (first send to last completion).
    `extra` and `keep_text` as in `send_one`.
    """
    arrivals = poisson_arrivals(len(specs), rate, seed)
    slots = asyncio.Semaphore(concurrency) if concurrency else None
    timeout = aiohttp.ClientTimeout(total=None, sock_read=600)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), timeout=timeout) as session:
        t0 = time.perf_counter()

        async def one(spec: RequestSpec, at: float) -> RequestRecord:
            await asyncio.sleep(max(0.0, at - (time.perf_counter() - t0)))
            async with slots or contextlib.nullcontext():
                return await send_one(session, url, api, spec, t0, extra=extra, keep_text=keep_text)

        records = await asyncio.gather(*(one(s, a) for s, a in zip(specs, arrivals)))
        duration = time.perf_counter() - t0
    return list(records), duration


async def warm_up(url: str, api: str, spec: RequestSpec, extra: dict | None = None) -> None:
    """One short request, not measured (first-call costs: allocator, caches, JIT; with `extra`'s
    `response_format`, the grammar's compilation)."""
    short = RequestSpec(-1, spec.prompt_ids[:16], spec.prompt_text[:64] or "Hello", 4)
    records, _ = await run_load(url, [short], api, extra=extra)
    if not records[0].ok:
        raise RuntimeError(f"warm-up request failed: {records[0].error}")


def _parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", required=True, help="a running server, e.g. http://127.0.0.1:3000")
    p.add_argument("--model-dir", default="models/SmolLM2-135M-Instruct", help="for the tokenizer (vocabulary)")
    p.add_argument("--api", choices=APIS, default="openai")
    p.add_argument("--workload", choices=("random", "nano-vllm"), default="random")
    p.add_argument("--num-requests", type=int, default=64)
    p.add_argument("--prompt-len", type=int, nargs=2, default=(32, 256), metavar=("MIN", "MAX"))
    p.add_argument("--output-len", type=int, nargs=2, default=(128, 128), metavar=("MIN", "MAX"))
    p.add_argument("--concurrency", type=int, default=None, help="closed loop of this many clients")
    p.add_argument("--rate", type=float, default=float("inf"), help="Poisson arrivals, requests/s")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None, help="write records and summary as JSON here")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    a = _parse_args(argv)
    if a.workload == "nano-vllm":
        specs = nano_vllm_requests(a.model_dir, a.num_requests, a.seed)
    else:
        specs = make_requests(a.model_dir, a.num_requests, tuple(a.prompt_len), tuple(a.output_len), a.seed)
    asyncio.run(warm_up(a.url, a.api, specs[0]))
    records, duration = asyncio.run(run_load(a.url, specs, a.api, a.concurrency, a.rate, a.seed))
    summary = summarize(records, duration)
    print(json.dumps(summary, indent=2))
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps({"summary": summary, "records": [r.to_json() for r in records]}))


if __name__ == "__main__":
    main()
