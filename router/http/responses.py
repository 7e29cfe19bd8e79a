"""JSON responses from the protocols' pydantic models."""

from aiohttp import web
from pydantic import BaseModel

from router.http.protocol import ErrorResponse, dump


def model_response(body: BaseModel, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(body=dump(body).encode(), status=status, headers=headers,
                        content_type="application/json")  # fmt: skip


def error_response(status: int, message: str, error_type: str) -> web.Response:
    """TGI's error shape, used for every error before a response starts."""
    return model_response(ErrorResponse(error=message, error_type=error_type), status)


def error_json(message: str, error_type: str) -> str:
    return dump(ErrorResponse(error=message, error_type=error_type))
