"""Server-sent event streams, as both APIs send them: the response's headers, and what a stream does
when generation fails after it started (the client gets an error event, never a cut connection)."""

import contextlib
import logging
from collections.abc import AsyncIterator, Callable

from aiohttp import web

from router.core.engine import GenerationError

log = logging.getLogger(__name__)


async def open_stream(request: web.Request, headers: dict[str, str]) -> web.StreamResponse:
    """Start an event stream with `headers` besides the ones every stream has."""
    response = web.StreamResponse(
        headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no", **headers}
    )
    await response.prepare(request)
    return response


@contextlib.asynccontextmanager
async def reporting_failures(
    request: web.Request, response: web.StreamResponse, error_event: Callable[[str, int], bytes]
) -> AsyncIterator[None]:
    """Turn a failure inside the block into one last event, `error_event(message, status)`: 424 for
    a generation error, 500 for a bug. A client that went away (ConnectionError) is left alone."""
    try:
        yield
    except GenerationError as e:
        await response.write(error_event(str(e), 424))
    except ConnectionError:
        raise
    except Exception:
        log.exception("stream failed on %s", request.path)
        await response.write(error_event("Internal server error", 500))
