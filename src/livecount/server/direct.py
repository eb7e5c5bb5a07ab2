"""Stream connections the hub writes to directly, without a task per connection.

uvicorn runs every WebSocket connection as an ASGI call: a task whose coroutine chain (the
middleware stack, the route, the endpoint) stays alive as long as the connection. For a
stream that is pure overhead once the first message is decided: ~30 KiB and a task wake-up per
connection per tick, against ~14 KiB and a plain ``transport.write`` for
``websockets.broadcast()``.

:class:`DirectProtocol` is uvicorn's sans-I/O ``websockets`` protocol (handshake, pings,
close handshake, flow control: all uvicorn's) with one addition: once the stream endpoint has
accepted the connection and decided what to send first, it **detaches** the connection from
ASGI (:meth:`DirectProtocol.detach`): the ASGI call returns (its tasks and frames are freed),
the transport stays open, and from then on the hub writes pre-encoded frames to the transport
synchronously at each tick, as ``broadcast()`` does — one shared bytes object for every
connection that sends the same message. What the client sends is discarded; its close frame
or a lost connection ends the stream through :meth:`~DirectStream.lost`. Under back-pressure
(the transport paused) the stream keeps what it owes as its usual bounded conflation state
and flushes it when the transport resumes; one paused for longer than the slow-client timeout
is cut (the gateway's watchdog).

The endpoint finds the protocol in ``scope["extensions"]["livecount.direct"]``; under another
WebSocket implementation it is absent and the stream runs its ASGI writer task instead (same
semantics, more cost).

**SSE** (:class:`DirectHttpProtocol`, uvicorn's httptools protocol) gets the same writes: the
endpoint starts the response through ASGI (``Transfer-Encoding: chunked``), then the hub
writes each event as a pre-encoded chunk to the transport, and the endpoint only awaits the
end of the stream (a future: no writer or reader task; the end of the response goes out
through ASGI again). An HTTP response cannot outlive its ASGI call in uvicorn, so an SSE
connection keeps that one call; heartbeats come from the gateway's watchdog.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Final

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.protocols.utils import ClientDisconnected
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol

from .hub import Payload, Stream

log = logging.getLogger("livecount.gateway")

if TYPE_CHECKING:
    from .sse import DirectSseStream

__all__ = ["EXTENSION", "DirectHttpProtocol", "DirectProtocol", "DirectStream"]

#: The scope extension under which the endpoint finds the protocol.
EXTENSION: Final = "livecount.direct"
#: How long a close frame to a slow client may take before the connection is aborted.
ABORT_AFTER: Final = 1.0


class _Discard:
    """Stands in for the ASGI receive queue once detached: nobody reads it any more."""

    __slots__ = ()

    def put_nowait(self, item: Any) -> None:
        pass


class _Flag:
    """Stands in for the ``writable`` event once detached (only ASGI ``send`` awaits it)."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = True

    def set(self) -> None:
        self.value = True

    def clear(self) -> None:
        self.value = False

    def is_set(self) -> bool:
        return self.value


_DISCARD: Final = _Discard()


class _Notifying:
    """Tells the stream that took the connection over when it pauses, resumes or ends."""

    stream: Any = None

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)  # type: ignore[misc]
        stream, self.stream = self.stream, None
        if stream is not None:
            stream.lost()

    def pause_writing(self) -> None:
        super().pause_writing()  # type: ignore[misc]
        if self.stream is not None:
            self.stream.paused()

    def resume_writing(self) -> None:
        super().resume_writing()  # type: ignore[misc]
        if self.stream is not None:
            self.stream.resumed()


class DirectProtocol(_Notifying, WebSocketsSansIOProtocol):
    """uvicorn's ``websockets-sansio`` protocol, detachable from ASGI (see the module)."""

    stream: DirectStream | None = None

    def handle_connect(self, event: Any) -> None:
        super().handle_connect(event)
        scope = getattr(self, "scope", None)
        if scope is not None:
            scope["extensions"][EXTENSION] = self

    def detach(self, stream: DirectStream) -> None:
        """From now on ``stream`` owns the connection: the ASGI call may return."""
        self.stream = stream
        # what only the handshake and the ASGI side needed
        self.request = self.response = None  # type: ignore[assignment]
        self.queue = _DISCARD  # type: ignore[assignment]
        self.writable = _Flag()  # type: ignore[assignment]
        self.scope = None  # type: ignore[assignment]
        if self.read_paused:  # a message the ASGI side never read: nobody reads them now
            self.read_paused = False
            self.transport.resume_reading()

    def send_receive_event_to_app(self) -> None:
        if self.stream is not None:  # detached: what the client sends is discarded, and
            self.frames = []  # reading goes on (pongs, the close frame)
            return
        super().send_receive_event_to_app()

    async def run_asgi(self) -> None:
        """uvicorn's, except that a detached connection stays open when the call returns."""
        try:
            await self.app(self.scope, self.receive, self.send)
        except ClientDisconnected:
            pass
        except BaseException:
            self.logger.exception("Exception in ASGI application\n")
            self.send_500_response()
        else:
            if not self.handshake_complete:
                self.logger.error("ASGI callable returned without completing handshake.")
                self.send_500_response()
        if self.stream is None and self.close_timer is None:
            self.transport.close()

    # -- what the stream does -------------------------------------------------------------

    def close_with(self, code: int, reason: str, *, abort_after: float | None = None) -> None:
        """Send a close frame; the transport closes when the client answers, and is aborted
        after ``abort_after`` (default: the close timeout) if it has not: a client that does
        not read would keep a plain close() waiting for its buffer forever."""
        if self.transport.is_closing():
            return
        if self.close_sent:  # cut short a close already under way
            if abort_after is not None:
                self.transport.abort()
            return
        self.stop_keepalive()
        self.conn.send_close(code, reason)
        self.transport.write(b"".join(self.conn.data_to_send()))
        self.close_sent = True
        self.close_timer = self.loop.call_later(
            self.close_timeout if abort_after is None else abort_after, self.transport.abort)


class DirectStream(Stream):
    """A stream written to synchronously by the hub (see the module docstring)."""

    __slots__ = ("_on_end", "protocol")

    def __init__(self, teammate: int | None, protocol: DirectProtocol) -> None:
        super().__init__(teammate)
        self.protocol = protocol
        self._on_end: Callable[[DirectStream], None] | None = None

    def attach(self, on_end: Callable[[DirectStream], None]) -> None:
        """Detach the connection from ASGI and start writing: ``on_end(self)`` once it ends
        (the client went, was cut, or took its reconnect message and closed)."""
        self._on_end = on_end
        self.protocol.detach(self)
        self._hold = False
        if self.protocol.disconnected:  # gone while the first message was being decided
            self.lost()
            return
        self.flush()

    def wake(self) -> None:
        if self._on_end is None:  # not attached yet: the endpoint flushes on attach
            return
        self.flush()

    def flush(self) -> None:
        """Write what the hub marked, now, while the transport takes it. A failure here
        (called from the hub's tick) cuts this connection only."""
        try:
            if self.write_now():
                self.outcome = self.outcome or "drained"
                self.protocol.close_with(1012, "server shutting down")
        except Exception:
            log.warning("writing to a stream failed; closing it", exc_info=True)
            self.protocol.transport.abort()

    def _write(self, payload: Payload) -> None:
        self.protocol.transport.write(payload.frame)

    def _blocked(self) -> bool:
        return self._paused or self.protocol.close_sent

    def kick(self, outcome: str) -> None:
        if not self.outcome:
            self.outcome = outcome
        if outcome == "slow":
            self.protocol.close_with(4000, "slow client", abort_after=ABORT_AFTER)
        else:
            self.protocol.close_with(1012, "server shutting down", abort_after=ABORT_AFTER)

    def lost(self) -> None:
        self.outcome = self.outcome or "disconnected"
        on_end, self._on_end = self._on_end, None
        if on_end is not None:
            on_end(self)


# -- Server-Sent Events -----------------------------------------------------------------------

class DirectHttpProtocol(_Notifying, HttpToolsProtocol):
    """uvicorn's httptools protocol, offering its transport to an SSE stream (see the
    module)."""

    stream: DirectSseStream | None = None

    def on_headers_complete(self) -> None:
        super().on_headers_complete()
        cycle = self.cycle
        if cycle is not None and cycle.scope is self.scope:
            extensions: dict[str, Any] = self.scope.setdefault("extensions", {})  # type: ignore[assignment]
            extensions[EXTENSION] = self
