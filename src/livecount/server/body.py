"""Request bodies: a size limit enforced while the bytes arrive, and strict JSON decoding.

The limit is a pure ASGI middleware (no per-request task): a declared ``Content-Length`` over
the limit is refused before anything is read; otherwise the bytes are counted as they are
received, so a chunked body or a lying ``Content-Length`` cannot get past it either.
"""

from __future__ import annotations

from typing import Any, Final

import anyio
import msgspec
from starlette.datastructures import Headers
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..domain import type_name
from ..exceptions import LivecountError, PayloadTooLarge, ValidationError
from .errors import error_response

__all__ = ["BodyLimit", "InvalidJSON", "UnsupportedMediaType", "fields", "read_json"]

_JSON_TYPES: Final = ("application/json", "application/merge-patch+json")
_DECODER: Final = msgspec.json.Decoder()
DRAIN_BYTES: Final = 64 << 20
DRAIN_SECONDS: Final = 5.0


class InvalidJSON(ValidationError):
    code = "invalid_json"


class UnsupportedMediaType(LivecountError):
    """A body that is not JSON. 400, not 415: DESIGN §5 lists the statuses clients handle."""

    status = 400
    code = "unsupported_media_type"


def _too_large(limit: int) -> PayloadTooLarge:
    return PayloadTooLarge(f"request bodies are limited to {limit} bytes")


class BodyLimit:
    """Refuse HTTP request bodies over ``max_bytes`` with 413.

    Before answering, the rest of the body is read and dropped (up to ``DRAIN_BYTES``, for
    at most ``DRAIN_SECONDS``): the server cannot read after it has answered, and a client
    still uploading would have its connection reset before it reads the 413. A client that
    waits for ``100 Continue`` has sent nothing, so nothing is drained.
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        declared = headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            if "100-continue" not in headers.get("expect", "").lower():
                await _drain(receive)
            error = _too_large(self.max_bytes)
            response = error_response(error.status, error.code, error.message,
                                      {"Connection": "close"})
            await response(scope, receive, send)
            return
        received = 0
        limit = self.max_bytes

        async def limited() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    if message.get("more_body", False):
                        await _drain(receive)
                    raise _too_large(limit)
            return message

        await self.app(scope, limited, send)


async def _drain(receive: Receive) -> None:
    drained = 0
    with anyio.move_on_after(DRAIN_SECONDS):
        while drained < DRAIN_BYTES:
            message = await receive()
            if message["type"] != "http.request" or not message.get("more_body", False):
                return
            drained += len(message.get("body", b""))


async def read_json(request: Request) -> Any:
    """The request's JSON body, decoded; 400 for another media type or bad JSON.

    A missing ``Content-Type`` is taken as JSON; ``application/json``,
    ``application/merge-patch+json`` and any ``+json`` type are accepted.
    """
    content_type = request.headers.get("content-type")
    if content_type is not None:
        media = content_type.split(";", 1)[0].strip().lower()
        if media not in _JSON_TYPES and not media.endswith("+json"):
            raise UnsupportedMediaType(
                f"expected a JSON body (Content-Type: application/json), got {media[:60]!r}")
    body = await request.body()
    if not body.strip():
        raise InvalidJSON("expected a JSON body, got an empty one")
    try:
        return _DECODER.decode(body)
    except RecursionError:
        raise InvalidJSON("JSON nested too deeply") from None
    except (msgspec.DecodeError, ValueError) as exc:  # ValueError: invalid UTF-8
        raise InvalidJSON(f"malformed JSON: {str(exc)[:200]}") from None


def fields(body: Any, required: tuple[str, ...], optional: tuple[str, ...] = ()
           ) -> dict[str, Any]:
    """``body`` as a JSON object with exactly the named keys (``required`` all present)."""
    if not isinstance(body, dict):
        raise ValidationError(f"expected a JSON object, got {type_name(body)}", "body")
    allowed = (*required, *optional)
    for key in body:
        if key not in allowed:
            raise ValidationError(f"unknown field; expected {', '.join(allowed)}", key[:60])
    for key in required:
        if key not in body:
            raise ValidationError("is required", key)
    return body
