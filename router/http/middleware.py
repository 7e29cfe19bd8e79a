"""Cross-cutting HTTP concerns, outermost first: CORS, tracing, errors and metrics, API key,
concurrency."""

import hmac
import logging

from aiohttp import web
from opentelemetry import trace

from router.core.engine import GenerationError
from router.http.errors import ApiError, Overloaded
from router.http.responses import error_response
from router.metrics import Metrics
from router.tracing import start_request_span

log = logging.getLogger(__name__)

GENERATION_ROUTES = frozenset({"/", "/generate", "/generate_stream", "/v1/chat/completions", "/v1/completions"})
PROTECTED_ROUTES = GENERATION_ROUTES | {"/tokenize"}  # behind --api-key, as in TGI


def _is_generation(request: web.Request) -> bool:
    """Counted in tgi_request_count and limited by --max-concurrent-requests."""
    return request.method == "POST" and request.path in GENERATION_ROUTES


def error_middleware(metrics: Metrics):
    """Map exceptions to TGI's error JSON and status codes; count requests and failures."""

    @web.middleware
    async def middleware(request: web.Request, handler):
        if _is_generation(request):
            metrics.request_count.inc()
        try:
            return await handler(request)
        except ApiError as e:
            if e.failure:
                metrics.request_failure.labels(e.failure).inc()
            return error_response(e.status, e.text, e.error_type)
        except GenerationError as e:  # counted by the engine
            return error_response(424, str(e), "generation")
        except web.HTTPException as e:
            if e.status < 400 or e.content_type == "application/json":
                raise
            return error_response(e.status, e.reason, "payload_too_large" if e.status == 413 else "bad_request")
        except Exception:
            log.exception("unhandled error on %s", request.path)
            return error_response(500, "Internal server error", "internal")

    return middleware


@web.middleware
async def tracing_middleware(request: web.Request, handler):
    """One server span per request; handlers and the engine find it as the current span."""
    span = start_request_span(f"{request.method} {request.path}", request.headers)
    with trace.use_span(span, end_on_exit=True):
        response = await handler(request)
        span.set_attribute("http.response.status_code", response.status)
        return response


def api_key_middleware(api_key: str):
    """Generation routes need `Authorization: Bearer <key>`; compared in constant time."""
    expected = f"Bearer {api_key}".encode()

    @web.middleware
    async def middleware(request: web.Request, handler):
        if request.method == "POST" and request.path in PROTECTED_ROUTES:
            given = request.headers.get("Authorization", "").encode()
            if not hmac.compare_digest(given, expected):
                return error_response(401, "Unauthorized", "authentication")
        return await handler(request)

    return middleware


def concurrency_middleware(max_concurrent_requests: int):
    """Refuse a generation request at once (429) while the limit is reached; a slot is held
    until the handler returns, which for a stream is after its last event."""
    in_flight = 0

    @web.middleware
    async def middleware(request: web.Request, handler):
        nonlocal in_flight
        if not _is_generation(request):
            return await handler(request)
        if in_flight >= max_concurrent_requests:
            raise Overloaded()
        in_flight += 1
        try:
            return await handler(request)
        finally:
            in_flight -= 1

    return middleware


def add_cors(app: web.Application, allowed_origins: tuple[str, ...]) -> None:
    """CORS for GET and POST: every origin when none are configured, else the listed ones."""

    def is_allowed(origin: str | None) -> bool:
        return origin is not None and (not allowed_origins or origin in allowed_origins)

    async def on_prepare(request: web.Request, response: web.StreamResponse) -> None:
        origin = request.headers.get("Origin")
        if is_allowed(origin):  # set here so that streams carry the headers too
            response.headers["Access-Control-Allow-Origin"] = origin if allowed_origins else "*"
            response.headers["Access-Control-Allow-Methods"] = "GET, POST"
            response.headers["Access-Control-Allow-Headers"] = "content-type, authorization"
            response.headers["Vary"] = "Origin"

    @web.middleware
    async def preflight(request: web.Request, handler):
        if request.method == "OPTIONS" and "Access-Control-Request-Method" in request.headers:
            return web.Response(status=204 if is_allowed(request.headers.get("Origin")) else 403)
        return await handler(request)

    app.on_response_prepare.append(on_prepare)
    app.middlewares.insert(0, preflight)
