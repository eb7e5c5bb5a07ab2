"""The Server-Sent Events transport of the stream: ``GET /api/workspaces/{ws}/stream``.

Each message is one event: ``data:`` the JSON, ``id:`` the seq on snapshots and deltas (so
``EventSource`` resumes with ``Last-Event-ID`` by itself), ``retry:`` the delay on a
reconnect message. A ``: ping`` comment goes out after ``heartbeat_interval`` without a
message. Refusals are JSON errors with their status, before any event. The response ends
after a reconnect message (drain) or when the client is too slow.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Final

import anyio
from starlette.types import Receive, Scope, Send

from ..exceptions import LivecountError
from .direct import EXTENSION, DirectHttpProtocol
from .errors import error_response
from .gateway import Gateway, Resume
from .hub import Payload, Stream

__all__ = ["DirectSseStream", "EventStream", "SseStream"]

log = logging.getLogger("livecount.gateway")

HEADERS: Final = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),  # nginx: do not buffer the stream
    (b"connection", b"close"),  # the end of the stream is the end of the connection
]
PING: Final = b": ping\n\n"
#: The heartbeat as one HTTP/1.1 chunk (what a direct write sends).
PING_CHUNK: Final = b"%x\r\n%s\r\n" % (len(PING), PING)
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
            heartbeat = gateway.settings.heartbeat_interval
            direct = scope.get("extensions", {}).get(EXTENSION)
            stream = (SseStream(teammate, send, heartbeat) if direct is None
                      else DirectSseStream(teammate, send, heartbeat, direct))
            await gateway.join(workspace_id, stream)
        except LivecountError as exc:
            headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
            await error_response(exc.status, exc.code, exc.message, headers)(
                scope, receive, send)
            return
        try:
            await send({"type": "http.response.start", "status": 200, "headers": HEADERS})
            if isinstance(stream, DirectSseStream) and stream.chunked:
                outcome = await _direct(gateway, stream, resume, after)
            else:
                outcome = await gateway.serve(stream, resume, after,
                                             lambda: _until_disconnect(receive))
        finally:
            gateway.leave(stream)
        if outcome in ("drained", "slow", "closed"):
            with anyio.move_on_after(END_GRACE):
                await send({"type": "http.response.body", "body": b"", "more_body": False})


class DirectSseStream(SseStream):
    """An SSE stream written to synchronously by the hub, in chunks, once attached (before:
    and when the response is not chunked, the ASGI writer of :class:`SseStream`); its
    endpoint awaits :attr:`done`."""

    __slots__ = ("done", "last_sent", "protocol", "sent")

    def __init__(self, teammate: int | None, send: Any, heartbeat: float,
                 protocol: DirectHttpProtocol) -> None:
        super().__init__(teammate, send, heartbeat)
        self.protocol = protocol
        self.last_sent = time.monotonic()
        #: a message went out since the watchdog last looked (which then moves last_sent:
        #: no clock read per delivery on the hub's tick)
        self.sent = False
        self.done: asyncio.Future[None] | None = None

    def attach(self) -> asyncio.Future[None]:
        """Start writing (the response has started); the future resolves when the stream
        ends: drained, cut, or the client went (:attr:`outcome` says which)."""
        self.done = asyncio.get_running_loop().create_future()
        self.protocol.stream = self
        self._hold = False
        cycle = self.protocol.cycle
        if (cycle is not None and cycle.disconnected) or self.protocol.transport.is_closing():
            self.end("disconnected")  # gone while the first message was being decided
        else:
            self.flush()
        return self.done

    @property
    def chunked(self) -> bool:
        """Whether the response went out chunked (what the direct writes produce)."""
        cycle = self.protocol.cycle
        return cycle is not None and cycle.chunked_encoding is True

    def wake(self) -> None:
        if self.done is not None:
            self.flush()
        else:
            super().wake()

    def flush(self) -> None:
        """Write what the hub marked, now, while the transport takes it. A failure here
        (called from the hub's tick) ends this stream only."""
        try:
            if self.write_now():
                self.end("drained")
        except Exception:
            log.warning("writing to a stream failed; ending it", exc_info=True)
            self.end("closed")

    def _write(self, payload: Payload) -> None:
        self.protocol.transport.write(payload.sse_chunk)
        self.sent = True

    def _blocked(self) -> bool:
        return self._paused or self._ended()

    def watch(self, now: float) -> None:
        if self.sent:  # (a heartbeat comes at most one watchdog period later for it)
            self.sent = False
            self.last_sent = now
        elif self.heartbeat is not None and now - self.last_sent >= self.heartbeat:
            self.beat()

    def beat(self) -> None:
        """A heartbeat comment (after a heartbeat period without a message)."""
        if not self._paused and not self._ended():
            self.protocol.transport.write(PING_CHUNK)
            self.last_sent = time.monotonic()

    def _ended(self) -> bool:
        return self.done is None or self.done.done()

    def end(self, outcome: str) -> None:
        if not self.outcome:
            self.outcome = outcome
        self.protocol.stream = None
        if self.done is not None and not self.done.done():
            self.done.set_result(None)

    def kick(self, outcome: str) -> None:
        self.end(outcome)  # the endpoint then ends the response (if the client takes it)

    def lost(self) -> None:
        self.end("disconnected")


async def _direct(gateway: Gateway, stream: DirectSseStream, resume: Resume | None,
                  after: tuple[str, int] | None) -> str:
    """Decide the first message, then let the hub write (:mod:`.direct`) until the stream
    ends; no task of its own meanwhile."""
    try:
        await gateway.begin(stream, resume, after)
        await stream.attach()
    finally:
        stream.end(stream.outcome or "closed")  # (also when cancelled: stop writing)
    return stream.outcome


async def _until_disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass
