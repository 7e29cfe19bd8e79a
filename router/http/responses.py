"""TGI's JSON shapes for generation results and errors."""

import math

from router.core.engine import Token, TokenEvent


def token_json(t: Token) -> dict:
    return {
        "id": t.id,
        "text": t.text,
        "logprob": t.logprob if math.isfinite(t.logprob) else None,
        "special": t.special,
    }


def error_json(message: str, error_type: str) -> dict:
    return {"error": message, "error_type": error_type}


def generate_json(events: list[TokenEvent], full_text_prefix: str, details: bool, seed: int | None) -> dict:
    """`GenerateResponse` for a finished request."""
    last = events[-1]
    body: dict = {"generated_text": full_text_prefix + last.generated_text}
    if details:
        body["details"] = {
            "finish_reason": last.finish_reason,
            "generated_tokens": len(events),
            "seed": seed,
            "prefill": [{k: v for k, v in token_json(t).items() if k != "special"} for t in last.prefill or []],
            "tokens": [token_json(e.token) for e in events],
        }
        if any(e.top_tokens for e in events):
            body["details"]["top_tokens"] = [[token_json(t) for t in e.top_tokens] for e in events]
    return body


def stream_json(
    index: int, event: TokenEvent, full_text_prefix: str, details: bool, seed: int | None, input_length: int
) -> dict:
    """One `StreamResponse` event; the last one carries the text and, if asked, the details."""
    body: dict = {"index": index, "token": token_json(event.token)}
    if event.top_tokens:
        body["top_tokens"] = [token_json(t) for t in event.top_tokens]
    body["generated_text"] = None if event.generated_text is None else full_text_prefix + event.generated_text
    body["details"] = None
    if event.finish_reason is not None and details:
        body["details"] = {
            "finish_reason": event.finish_reason,
            "generated_tokens": index,
            "seed": seed,
            "input_length": input_length,
        }
    return body
