"""The Server-Sent Events transport of the stream: ``GET /api/workspaces/{ws}/stream``.

Each message is one event: ``data:`` the JSON, ``id:`` the seq on snapshots and deltas (so
``EventSource`` resumes with ``Last-Event-ID`` by itself), ``retry:`` the delay on a
reconnect message. A ``: ping`` comment goes out after ``heartbeat_interval`` without a
message. Refusals are JSON errors with their status, before any event. The response ends
after a reconnect message (drain) or when the client is too slow.
"""

from __future__ import annotations

from typing import Final

import anyio
from starlette.types import Receive, Scope, Send

from ..exceptions import LivecountError
from .errors import error_response
from .gateway import Gateway
from .hub import Payload, Stream

__all__ = ["EventStream", "SseStream"]

HEADERS: Final = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),  # nginx: do not buffer the stream
    (b"connection", b"close"),  # the end of the stream is the end of the connection
]
PING: Final = b": ping\n\n"
#: How long the end of the response may take to go out (a slow client may never take it).
END_GRACE: Final = 1.0


class SseStream(Stream):
    __slots__ = ("_send", "heartbeat")

    def __init__(self, teammate: int | None, send: Send, heartbeat: float) -> None:
        super().__init__(teammate)
        self._send = send
        self.heartbeat = heartbeat

    async def send(self, payload: Payload) -> None:
        await self._send({"type": "http.response.body", "body": payload.sse, "more_body": True})

    async def ping(self) -> None:
        await self._send({"type": "http.response.body", "body": PING, "more_body": True})


class EventStream:
    """The ASGI endpoint."""

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        gateway = self.gateway
        workspace_id: int = scope["path_params"]["workspace_id"]
        try:
            teammate, resume, after = await gateway.admit(scope, workspace_id, last_event_id=True)
            if scope["method"] == "HEAD":
                await send({"type": "http.response.start", "status": 200, "headers": HEADERS})
                await send({"type": "http.response.body", "body": b""})
                return
            stream = SseStream(teammate, send, gateway.settings.heartbeat_interval)
            await gateway.join(workspace_id, stream)
        except LivecountError as exc:
            headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
            await error_response(exc.status, exc.code, exc.message, headers)(
                scope, receive, send)
            return
        try:
            await send({"type": "http.response.start", "status": 200, "headers": HEADERS})
            outcome = await gateway.serve(stream, resume, after,
                                         lambda: _until_disconnect(receive))
        finally:
            gateway.leave(stream)
        if outcome in ("drained", "slow", "closed"):
            with anyio.move_on_after(END_GRACE):
                await send({"type": "http.response.body", "body": b"", "more_body": False})


async def _until_disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass
