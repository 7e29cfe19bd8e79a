"""What every route reads: the server's state on the app, and the JSON body of a request."""

import json
import re
from dataclasses import dataclass

from aiohttp import web

from router.core.engine import Engine
from router.core.shard_client import ModelInfo, ShardedClient
from router.http.responses import error_json
from router.limits import ValidationLimits
from router.metrics import Metrics
from router.tokenizer import Tokenizer


@dataclass(frozen=True, slots=True)
class ServerState:
    engine: Engine
    shards: ShardedClient
    tokenizer: Tokenizer
    limits: ValidationLimits
    model_info: ModelInfo
    model_id: str
    max_concurrent_requests: int
    metrics: Metrics


STATE = web.AppKey("state", ServerState)


# A JSON escape of a UTF-16 surrogate: the only way (with raw surrogate bytes) to put a lone one in a string.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


def parse_json(raw: bytes) -> object:
    """`raw` as JSON, refusing what `json` accepts but no tokenizer or client can use (ValueError):
    nesting deeper than the interpreter's recursion limit, and lone UTF-16 surrogates (`"\\ud800"`),
    which cannot be encoded as UTF-8 (serde_json, and so TGI, refuses both)."""
    try:
        body = json.loads(raw)
    except RecursionError:
        raise ValueError("nested too deeply") from None
    if not raw.isascii() or _SURROGATE_ESCAPE.search(raw):
        try:
            json.dumps(body, ensure_ascii=False).encode()
        except UnicodeEncodeError:
            raise ValueError("lone Unicode surrogate in a string") from None
        except RecursionError:
            raise ValueError("nested too deeply") from None
    return body


def is_json_content_type(content_type: str) -> bool:
    """`application/json` or a `+json` suffix type (parameters such as charset aside), as TGI's axum accepts."""
    return content_type == "application/json" or (
        content_type.startswith("application/") and content_type.endswith("+json")
    )


async def json_body(request: web.Request) -> object:
    if not is_json_content_type(request.content_type):
        # A browser sends text/plain or form posts cross-origin without a CORS preflight: refusing
        # every other type keeps such pages from driving the API with a visitor's credentials.
        raise web.HTTPUnsupportedMediaType(
            text=error_json("Expected request with `Content-Type: application/json`", "unsupported_media_type"),
            content_type="application/json",
        )
    try:
        return parse_json(await request.read())
    except ValueError as e:  # UnicodeDecodeError included
        raise web.HTTPBadRequest(
            text=error_json(f"Malformed JSON: {e}", "bad_request"), content_type="application/json"
        ) from None
