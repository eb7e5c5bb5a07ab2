"""One error shape for every failure: ``{"error": {"code": ..., "message": ...}}``.

Routing errors (404, 405), :class:`~livecount.exceptions.LivecountError` subclasses (which
carry their own status and code) and anything unexpected (a bug: logged, answered 500) all
leave through :func:`error_response`, so a client never has to parse two formats.

Every 503 (overload, draining, a busy or unreachable database) carries ``Retry-After``: whole
seconds, the exception's ``retry_after`` when it has one.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from http import HTTPStatus
from typing import Any, Final

import msgspec
from starlette.exceptions import HTTPException
from starlette.requests import HTTPConnection, Request
from starlette.responses import Response
from starlette.websockets import WebSocket

from ..exceptions import LivecountError

__all__ = [
    "CODES",
    "JSONResponse",
    "error_response",
    "exception_handlers",
    "http_error",
    "internal_error",
    "livecount_error",
]

log = logging.getLogger("livecount.server")

#: Machine-readable codes of the statuses the server itself produces.
CODES: Final[dict[int, str]] = {
    400: "invalid",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    412: "version_mismatch",
    413: "payload_too_large",
    422: "unprocessable",
    429: "too_many_requests",
    500: "internal",
    503: "unavailable",
}

_ENCODER: Final = msgspec.json.Encoder()
#: ``Retry-After`` seconds of a 503 whose cause names none.
DEFAULT_RETRY_AFTER: Final = 1


class JSONResponse(Response):
    """A JSON response encoded with msgspec: several times faster than ``json.dumps``."""

    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return _ENCODER.encode(content)


def error_response(status: int, code: str, message: str,
                   headers: Mapping[str, str] | None = None) -> JSONResponse:
    """The error body; every 503 carries ``Retry-After`` (``headers`` may set its value)."""
    body = {"error": {"code": code, "message": message}}
    all_headers = dict(headers or {})
    if status == 503 and not any(k.lower() == "retry-after" for k in all_headers):
        all_headers["Retry-After"] = str(DEFAULT_RETRY_AFTER)
    return JSONResponse(body, status_code=status, headers=all_headers)


async def http_error(conn: HTTPConnection, exc: Exception) -> Response | None:
    """Starlette's own errors: no route (404), wrong method (405), ..."""
    assert isinstance(exc, HTTPException)
    status = exc.status_code
    if status == 404:
        message = f"no route matches {conn.url.path}"
    elif status == 405 and isinstance(conn, Request):
        allowed = (exc.headers or {}).get("Allow", "")
        message = f"{conn.method} is not allowed here; allowed: {allowed}"
    else:
        message = exc.detail or HTTPStatus(status).phrase
    if isinstance(conn, WebSocket):
        await conn.close(code=1008, reason=message[:120])
        return None
    return error_response(status, CODES.get(status, "error"), message, exc.headers)


async def livecount_error(conn: HTTPConnection, exc: Exception) -> Response | None:
    """A refusal raised on purpose anywhere below a handler: its status and code."""
    assert isinstance(exc, LivecountError)
    if exc.status >= 500:
        log.error("%s %s failed: %s", _method(conn), conn.url.path, exc.message,
                  exc_info=exc)
    if isinstance(conn, WebSocket):
        await conn.close(code=1008 if exc.status < 500 else 1011, reason=exc.message[:120])
        return None
    headers = ({"WWW-Authenticate": "Bearer"} if exc.status == 401
               else {"Connection": "close"} if exc.status == 413
               else {"Retry-After": str(_retry_after(exc))} if exc.status == 503 else None)
    return error_response(exc.status, exc.code, exc.message, headers)


def _retry_after(exc: LivecountError) -> int:
    """Whole seconds to wait: the exception's own ``retry_after`` (see
    :class:`~livecount.exceptions.Unavailable`), else the default."""
    value = getattr(exc, "retry_after", DEFAULT_RETRY_AFTER)
    return value if isinstance(value, int) and value >= 0 else DEFAULT_RETRY_AFTER


async def internal_error(request: Request, exc: Exception) -> Response:
    """A bug: no input may get here (the bad-input tests prove it). Log, count, answer."""
    log.error("%s %s raised", request.method, request.url.path, exc_info=exc)
    state = request.app.state
    state.internal_errors = getattr(state, "internal_errors", 0) + 1
    return error_response(500, "internal", "internal error; it has been logged")


def _method(conn: HTTPConnection) -> str:
    method: str = conn.scope.get("method", "WEBSOCKET")
    return method


def exception_handlers() -> dict[Any, Any]:
    return {HTTPException: http_error, LivecountError: livecount_error,
            Exception: internal_error}
