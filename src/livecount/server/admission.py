"""Admission control for stream connections: a process-wide cap and a per-token cap.

Nothing else bounds stream connections: without this one token could open connections until
the process runs out of file descriptors, taking every other tenant with it. A pure-ASGI
middleware in front of the app counts the stream requests in progress (WebSocket
connections and ``GET …/stream``), from the handshake to the end of the connection:

- past ``max_streams`` in the process: **503** with ``Retry-After`` (another process, or
  this one a little later, will take it); the default stays below the fd limit
  (:func:`default_max_streams`), and ``/readyz`` turns false from
  :data:`READY_FRACTION` of the cap, so a load balancer stops sending new clients first;
- past ``max_streams_per_token`` for one bearer token: **429** with ``Retry-After``.

The check runs before authentication (it costs no database read), so a flood of unknown
tokens is capped as cheaply as a known one. Tokens are held only as a hash, and only while
they have a connection open. Refusals are counted by reason for ``/metrics``.
"""

from __future__ import annotations

import hashlib
import re
import resource
from collections.abc import Callable
from typing import Any, Final

from starlette.requests import HTTPConnection
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .auth import bearer_token
from .errors import error_response

__all__ = ["READY_FRACTION", "SLOT", "STREAM_PATH", "Admission", "AdmissionMiddleware", "Slot",
           "default_max_streams"]

#: Readiness turns false once this fraction of the process cap is in use.
READY_FRACTION: Final = 0.9
#: ``Retry-After`` (seconds) of a refusal for the process cap / the token cap.
RETRY_PROCESS: Final = 2
RETRY_TOKEN: Final = 5
#: The stream endpoints' paths: groups (workspace id, "ws" or "stream").
STREAM_PATH: Final = re.compile(r"/api/workspaces/([0-9]+)/(ws|stream)")
#: The route template SSE requests are counted under.
SSE_ROUTE: Final = "/api/workspaces/{workspace_id}/stream"
#: The scope key of a stream's :class:`Slot` (a connection that outlives its ASGI call keeps
#: it, and gives it back when it ends).
SLOT: Final = "livecount.admission"


def default_max_streams() -> int:
    """The process cap when none is configured: the soft open-file limit less a reserve for
    the database, the listener, logs and the requests of the JSON API (10% of it, at least
    64), and at least 16."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft <= 0:
        soft = 1 << 20
    return max(16, soft - max(64, soft // 10))


class Admission:
    """The counts behind the caps. One per app; single-threaded (the event loop)."""

    def __init__(self, max_streams: int | None = None, per_token: int = 100) -> None:
        self.max_streams = max_streams if max_streams is not None else default_max_streams()
        self.per_token = per_token
        self.active = 0
        self.by_token: dict[bytes, int] = {}
        self.refused: dict[str, int] = {"process": 0, "token": 0}

    @property
    def near_cap(self) -> bool:
        """Whether readiness should be false: the process is close to its cap."""
        return self.active >= max(1, int(self.max_streams * READY_FRACTION))

    def admit(self, key: bytes | None) -> str | None:
        """Take a slot for a stream of token ``key`` (None: no token): None when admitted,
        else the cap that refuses it (``"process"`` or ``"token"``)."""
        if self.active >= self.max_streams:
            self.refused["process"] += 1
            return "process"
        if key is not None and self.per_token and self.by_token.get(key, 0) >= self.per_token:
            self.refused["token"] += 1
            return "token"
        self.active += 1
        if key is not None:
            self.by_token[key] = self.by_token.get(key, 0) + 1
        return None

    def release(self, key: bytes | None) -> None:
        self.active -= 1
        if key is not None:
            left = self.by_token[key] - 1
            if left:
                self.by_token[key] = left
            else:
                del self.by_token[key]


class Slot:
    """One admitted stream's place under the caps; given back once, by whoever ends it."""

    __slots__ = ("admission", "kept", "key", "released")

    def __init__(self, admission: Admission, key: bytes | None) -> None:
        self.admission = admission
        self.key = key
        self.kept = False
        self.released = False

    def keep(self) -> None:
        """The connection goes on after its ASGI call (a detached WebSocket): whoever keeps
        it calls :meth:`release` when it ends."""
        self.kept = True

    def release(self) -> None:
        if not self.released:
            self.released = True
            self.admission.release(self.key)


def is_stream(scope: Scope) -> bool:
    if scope["type"] == "websocket":
        return True
    if scope["type"] != "http" or scope.get("method") not in ("GET", "HEAD"):
        return False
    match = STREAM_PATH.fullmatch(scope.get("path", ""))
    return match is not None and match.group(2) == "stream"


class AdmissionMiddleware:
    """The outermost middleware of the app. Stream requests are admitted (or refused)
    here and, when ``route`` names their endpoint, handed to it directly: a stream
    connection then keeps only this frame alive, not the middleware stack and the router
    (SSE responses are counted in ``metrics`` here, as the metrics middleware would)."""

    def __init__(self, app: ASGIApp, admission: Admission,
                 route: Callable[[Scope], ASGIApp | None] | None = None,
                 metrics: Any = None) -> None:
        self.app = app
        self.admission = admission
        self.route = route
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if not is_stream(scope):
            await self.app(scope, receive, send)
            return
        token = bearer_token(HTTPConnection(scope), query=True)
        key = hashlib.sha256(token.encode()).digest()[:16] if token else None
        refused = self.admission.admit(key)
        if refused is not None:
            await _refuse(scope, receive, send, refused, self.admission)
            return
        slot = scope[SLOT] = Slot(self.admission, key)
        endpoint = self.route(scope) if self.route is not None else None
        try:
            if endpoint is None:
                await self.app(scope, receive, send)
            elif scope["type"] == "http" and self.metrics is not None:
                await _counted(endpoint, self.metrics, scope, receive, send)
            else:
                await endpoint(scope, receive, send)
        finally:
            if not slot.kept:
                slot.release()


async def _counted(endpoint: ASGIApp, metrics: Any, scope: Scope, receive: Receive,
                   send: Send) -> None:
    """An SSE request past the router: counted in the HTTP request metrics by its route."""
    status = 500

    async def observed(message: Message) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]
        await send(message)

    try:
        await endpoint(scope, receive, observed)
    finally:
        metrics.requests.labels(SSE_ROUTE, scope.get("method", "GET"), str(status)).inc()


async def _refuse(scope: Scope, receive: Receive, send: Send, cap: str,
                  admission: Admission) -> None:
    if cap == "process":
        status, code, retry = 503, "unavailable", RETRY_PROCESS
        message = (f"this server holds its maximum of {admission.max_streams} stream "
                   "connections; retry (another server may take it)")
    else:
        status, code, retry = 429, "too_many_requests", RETRY_TOKEN
        message = (f"this token already holds {admission.per_token} stream connections on "
                   "this server; close one or retry later")
    response = error_response(status, code, message, {"Retry-After": str(retry)})
    if scope["type"] == "websocket":
        if (await receive())["type"] != "websocket.connect":
            return
        if "websocket.http.response" not in scope.get("extensions", {}):
            await send({"type": "websocket.close", "code": 4000 + status,
                        "reason": message[:120]})
            return
    await response(scope, receive, send)
