"""The WebSocket transport of the stream: ``/api/workspaces/{ws}/ws``.

Text frames carrying the stream's JSON messages. A refused handshake is answered with an
HTTP error (401/403/404/400/503 and the JSON error body) through the ASGI WebSocket denial
response; on a server without that extension it is a close before accept (HTTP 403 on the
wire) with code 4000 + status (4401, 4403, ...) and the message as reason.

Close codes: 1012 after a reconnect message (drain), 4000 "slow client". Messages from the
client are read and discarded (the server's ``ws_max_size`` bounds them).
"""

from __future__ import annotations

import contextlib
from typing import Final

import anyio
from starlette.types import Receive, Scope, Send

from ..exceptions import LivecountError
from .admission import SLOT, Slot
from .direct import EXTENSION, DirectStream
from .errors import error_response
from .gateway import CLOSE_DRAIN, CLOSE_SLOW, Gateway, Resume
from .hub import Payload, Stream

__all__ = ["WebSocketStream", "WsStream"]

#: How long a close frame may take to go out (a slow client may never take it).
CLOSE_GRACE: Final = 1.0


class WsStream(Stream):
    __slots__ = ("_send",)

    def __init__(self, teammate: int | None, send: Send) -> None:
        super().__init__(teammate)
        self._send = send

    async def send(self, payload: Payload) -> None:
        await self._send({"type": "websocket.send", "text": payload.text})


class WebSocketStream:
    """The ASGI endpoint."""

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        message = await receive()
        if message["type"] != "websocket.connect":
            return
        gateway = self.gateway
        workspace_id: int = scope["path_params"]["workspace_id"]
        direct = scope.get("extensions", {}).get(EXTENSION)
        stream: Stream
        try:
            teammate, resume, after = await gateway.admit(scope, workspace_id, last_event_id=False)
            stream = (WsStream(teammate, send) if direct is None
                      else DirectStream(teammate, direct))
            await gateway.join(workspace_id, stream)
        except LivecountError as exc:
            await _deny(scope, receive, send, exc)
            return
        if isinstance(stream, DirectStream):
            await self._detach(scope, send, stream, resume, after)
            return
        try:
            await send({"type": "websocket.accept"})
            outcome = await gateway.serve(stream, resume, after,
                                         lambda: _until_disconnect(receive))
        except OSError:  # gone during the handshake
            return
        finally:
            gateway.leave(stream)
        if outcome == "drained":
            await _close(send, CLOSE_DRAIN, "server shutting down")
        elif outcome == "slow":
            await _close(send, CLOSE_SLOW, "slow client")

    async def _detach(self, scope: Scope, send: Send, stream: DirectStream,
                      resume: Resume | None, after: tuple[str, int] | None) -> None:
        """Accept, decide the first message, then hand the connection to the hub's direct
        writes (:mod:`.direct`): this ASGI call returns, the connection stays."""
        gateway = self.gateway
        slot: Slot | None = scope.get(SLOT)
        attached = False
        try:
            await send({"type": "websocket.accept"})
            await gateway.begin(stream, resume, after)

            def ended(ended: DirectStream) -> None:
                gateway.leave(ended)
                if slot is not None:
                    slot.release()

            stream.attach(ended)
            attached = True
            if slot is not None:
                slot.keep()  # (released by ended(); at once if it ended during attach)
        except OSError:  # gone during the handshake
            return
        finally:
            if not attached:  # the ASGI side still owns it: uvicorn closes the transport
                stream.protocol.stream = None
                gateway.leave(stream)


async def _until_disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "websocket.disconnect":
        pass


async def _close(send: Send, code: int, reason: str) -> None:
    # OSError: already gone; RuntimeError: the server saw the close already
    with anyio.move_on_after(CLOSE_GRACE), contextlib.suppress(OSError, RuntimeError):
        await send({"type": "websocket.close", "code": code, "reason": reason})


async def _deny(scope: Scope, receive: Receive, send: Send, exc: LivecountError) -> None:
    if "websocket.http.response" in scope.get("extensions", {}):
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
        await error_response(exc.status, exc.code, exc.message, headers)(scope, receive, send)
    else:
        await send({"type": "websocket.close", "code": 4000 + exc.status,
                    "reason": exc.message[:120]})
