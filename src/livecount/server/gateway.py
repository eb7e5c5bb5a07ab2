"""The live stream gateway: WebSocket and SSE routes over one hub per workspace.

Life of a stream (same on both transports, see :mod:`.ws` and :mod:`.sse`):

1. :meth:`Gateway.admit` — the token (``Authorization: Bearer`` or ``?token=``) and tenancy,
   in the same order as the JSON API (:mod:`.auth`): no or unknown token → 401; a teammate
   token on another workspace's path → 403, whether that workspace exists or not; the admin
   token on a workspace that does not exist → 404; a draining gateway → 503. ``?since=S``
   (or, on SSE, ``Last-Event-ID: S``) asks to resume; a malformed one → 400.
2. :meth:`Gateway.join` — the workspace's :class:`~.hub.Hub` (created with the first stream,
   removed with the last).
3. :meth:`Gateway.serve` — ONE task group per connection: a reader that waits for the client
   to go (and discards anything it sends), and the writer (the connection's own task) that
   sends a snapshot or the resume delta, then whatever the hub marks. When either ends, the
   group cancels the other.
4. :meth:`Gateway.leave`.

Resume: when the bus still holds ``S`` (``bus.since``), ONE delta with the current value of
every counter changed after ``S`` (possibly empty: it confirms the resume); when it does not,
when ``S`` is ahead of the server, or when the views changed meanwhile: the view list (in the
last case) and a snapshot.

Slow clients: a send that has not completed after ``slow_client_timeout`` (the transport's
buffer is full because the client does not read) gets the connection closed — WebSocket close
code 4000 "slow client", or the end of the SSE response — checked by one watchdog task for
the whole gateway rather than a timer per send. What the client missed is not queued: it
resumes on reconnect.

Drain (:meth:`Gateway.stop`): no new streams (503); every stream gets
``{"type":"reconnect","reason":"server shutting down","retry_ms":...}`` (the delay is
jittered so clients do not all come back at once), then WebSocket close 1012 (service
restart) or the end of the SSE response. ``stop()`` returns when every stream has ended (a
client that does not read the reconnect message is cut after ``slow_client_timeout`` by the
watchdog, and whatever is left after ``drain_timeout`` is cut then).

Heartbeats: SSE sends a ``: ping`` comment after ``heartbeat_interval`` without a message.
WebSocket uses the server's protocol-level ping frames, which browsers answer by themselves
and which keep the message protocol clean: run uvicorn with :func:`uvicorn_options`.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import random
import re
import time
from collections.abc import Awaitable, Callable
from typing import Any, Final

import anyio
from starlette.requests import HTTPConnection
from starlette.routing import BaseRoute, Route, WebSocketRoute
from starlette.types import ASGIApp, Scope

from ..exceptions import Forbidden, Unauthorized, Unavailable, ValidationError
from ..service import Service, Settings, wait_for_position
from .admission import STREAM_PATH
from .auth import bearer_token
from .hub import Hub, Payload, Stream
from .metrics import LagHistogram

__all__ = ["CLOSE_DRAIN", "CLOSE_SLOW", "Gateway", "Resume", "uvicorn_options"]

log = logging.getLogger("livecount.gateway")

#: WebSocket close code after a reconnect message (RFC 6455 "Service Restart").
CLOSE_DRAIN: Final = 1012
#: WebSocket close code of a client that could not keep up (reason "slow client").
CLOSE_SLOW: Final = 4000
#: How long a resume waits for the hub to reach the client's seq (it lags the bus briefly).
RESUME_WAIT: Final = 1.0
#: How long a stream connect with ``?after=P`` waits for the counts to reflect P.
AFTER_WAIT: Final = 5.0
#: Reconnect delay told to drained clients: this, plus up to the same again at random.
RETRY_MS: Final = 1000
_MAX_SEQ_DIGITS: Final = 18
_EPOCH: Final = re.compile(r"[A-Za-z0-9_-]{1,64}")

#: Where a client resumes: (epoch or None when it named none, seq).
Resume = tuple[str | None, int]


def uvicorn_options(settings: Settings) -> dict[str, Any]:
    """The uvicorn settings the gateway relies on: the sans-I/O ``websockets`` protocol,
    detachable so the hub writes to it directly (:mod:`.direct`; it applies back-pressure,
    which slow-client detection needs), protocol pings
    every ``heartbeat_interval``, no compression (it costs ~100 KiB per connection), and
    small incoming messages (clients have nothing to send)."""
    return {
        "ws": "livecount.server.direct:DirectProtocol",
        "http": "livecount.server.direct:DirectHttpProtocol",
        "ws_ping_interval": settings.heartbeat_interval,
        "ws_ping_timeout": settings.heartbeat_interval,
        "ws_per_message_deflate": False,
        "ws_max_size": 64 * 1024,
    }


class Gateway:
    """The stream side of one server process. ``start()``/``stop()`` bracket its tasks: one
    per hub and a watchdog; connections' tasks belong to the server's request tasks and end
    with them (``stop()`` waits for them)."""

    def __init__(self, service: Service) -> None:
        self.service = service
        self.settings = service.settings
        #: streams closed because the client could not keep up
        self.slow_clients = 0
        #: streams opened since start (a counter for metrics)
        self.opened = 0
        #: seconds from a hub receiving a change to the send that carried it (see .hub)
        self.delivery = LagHistogram()
        self._hubs: dict[int, Hub] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._count = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._accepting = False
        self._stopped = False

    # -- life cycle -------------------------------------------------------------------------

    async def start(self) -> None:
        if self._accepting or self._stopped:
            return
        self._accepting = True
        self._spawn(self._watchdog(), "livecount-gateway-watchdog")

    async def stop(self) -> None:
        """Tell every stream to reconnect, wait for all of them to end, end the hubs."""
        if self._stopped:
            return
        self._stopped = True
        self._accepting = False
        for stream in self._streams():
            retry = RETRY_MS + random.randrange(RETRY_MS)
            stream.close(Payload({"type": "reconnect", "reason": "server shutting down",
                                  "retry_ms": retry}, retry=retry))
        with anyio.move_on_after(self.settings.drain_timeout):
            await self._idle.wait()
        if self._count:
            log.warning("cutting %d streams that did not take the reconnect message",
                        self._count)
            for stream in self._streams():
                stream.kick("drained")
            with anyio.move_on_after(2.0):
                await self._idle.wait()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def routes(self) -> list[BaseRoute]:
        return [
            WebSocketRoute("/api/workspaces/{workspace_id:int}/ws", self._ws_endpoint,
                           name="stream_ws"),
            Route("/api/workspaces/{workspace_id:int}/stream", self._sse_endpoint,
                  methods=["GET"], name="stream_sse"),
        ]

    @functools.cached_property
    def _ws_endpoint(self) -> ASGIApp:
        from .ws import WebSocketStream

        return WebSocketStream(self)

    @functools.cached_property
    def _sse_endpoint(self) -> ASGIApp:
        from .sse import EventStream

        return EventStream(self)

    def endpoint(self, scope: Scope) -> ASGIApp | None:
        """The stream endpoint for ``scope``, with its path parameters set, or None: what
        the outermost middleware calls directly, so a stream connection does not keep the
        whole middleware stack and router alive (the routes above serve the same paths,
        for the OpenAPI listing and any other caller)."""
        match = STREAM_PATH.fullmatch(scope.get("path", ""))
        if match is None:
            return None
        kind = match.group(2)
        if scope["type"] == "websocket" and kind == "ws":
            endpoint = self._ws_endpoint
        elif scope["type"] == "http" and kind == "stream" and scope.get("method") in (
                "GET", "HEAD"):
            endpoint = self._sse_endpoint
        else:
            return None
        scope["path_params"] = {"workspace_id": int(match.group(1))}
        return endpoint

    @property
    def connections(self) -> int:
        """Streams currently open (WebSocket and SSE)."""
        return self._count

    @property
    def hubs(self) -> int:
        return len(self._hubs)

    def hub(self, workspace_id: int) -> Hub | None:
        """The live hub of a workspace (None when it has no stream here)."""
        return self._hubs.get(workspace_id)

    def _streams(self) -> list[Stream]:
        return [s for hub in list(self._hubs.values()) for s in list(hub.streams)]

    def _spawn(self, coro: Awaitable[None], name: str) -> asyncio.Task[None]:
        task: asyncio.Task[None] = asyncio.ensure_future(coro)
        task.set_name(name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _watchdog(self) -> None:
        """Close streams stuck in one send (or paused) for longer than
    ``slow_client_timeout``; let directly written streams send their heartbeats."""
        timeout = self.settings.slow_client_timeout
        period = min(1.0, max(0.01, timeout / 4),
                     max(0.01, self.settings.heartbeat_interval / 2))
        while True:
            await anyio.sleep(period)
            now = time.monotonic()
            for stream in self._streams():
                stream.watch(now)
                since = stream.sending_since
                if since and now - since > timeout and not stream.outcome:
                    self.slow_clients += 1
                    log.info("closing a stream of workspace %s: slow client (a send took "
                             "over %.1f s)", stream.hub and stream.hub.workspace_id, timeout)
                    stream.kick("slow")

    # -- one stream -------------------------------------------------------------------------

    async def admit(self, scope: Scope, workspace_id: int, *,
                    last_event_id: bool
                    ) -> tuple[int | None, Resume | None, tuple[str, int] | None]:
        """The viewing teammate (None: the admin), where to resume from (``?epoch=E&since=S``,
        or on SSE ``Last-Event-ID: E:S``) and the outbox position the first counts must
        reflect (``?after=P``: answered as the (epoch, seq) of the state once it does), or
        raise the refusal
        (:class:`~livecount.exceptions.LivecountError`)."""
        conn = HTTPConnection(scope)
        token = bearer_token(conn, query=True)
        if not token:
            raise Unauthorized("missing token (Authorization: Bearer <token>, or ?token=)")
        caller = await self.service.authenticate(token)
        if caller is None:
            raise Unauthorized("invalid token")
        if caller.teammate is None:
            if self._hubs.get(workspace_id) is None:
                await self.service.store.get_workspace(workspace_id)  # NotFound when absent
        elif caller.teammate.workspace_id != workspace_id:
            raise Forbidden(f"this token gives no access to workspace {workspace_id}")
        resume = _resume(conn.query_params.get("epoch"), conn.query_params.get("since"))
        if resume is None and last_event_id and "since" not in conn.query_params:
            header = conn.headers.get("last-event-id")
            if header is not None and header.strip():
                epoch, _, seq = header.strip().rpartition(":")
                resume = _resume(epoch or None, seq, "Last-Event-ID")
        after = conn.query_params.get("after")
        if not self._accepting:
            raise Unavailable("the server is not accepting streams (shutting down); retry")
        reach = None
        if after is not None:
            reach = await self._reflect(workspace_id, _number(after, "after"))
        return caller.teammate_id, resume, reach

    async def join(self, workspace_id: int, stream: Stream) -> Hub:
        """Attach ``stream`` to the workspace's hub (starting it if needed)."""
        if not self._accepting:
            raise Unavailable("the server is not accepting streams (shutting down); retry")
        hub = self._hubs.get(workspace_id)
        if hub is None:
            hub = self._hubs[workspace_id] = Hub(self.service, workspace_id,
                                                 self.settings.flush_interval)
            hub.delivery = self.delivery
            hub.task = self._spawn(hub.run(), f"livecount-hub-{workspace_id}")
            hub.task.add_done_callback(functools.partial(self._hub_ended, hub))
        hub.streams.add(stream)
        stream.hub = hub
        self._count += 1
        self.opened += 1
        self._idle.clear()
        try:
            await hub.loaded.wait()
            if hub.failed is not None:
                raise Unavailable("live counts are unavailable right now; retry")
        except BaseException:
            self.leave(stream)
            raise
        return hub

    def leave(self, stream: Stream) -> None:
        """Detach ``stream``; the last one out ends the hub. Idempotent."""
        hub = stream.hub
        if hub is None:
            return
        stream.hub = None
        hub.streams.discard(stream)
        self._count -= 1
        if not hub.streams:
            self._forget(hub)
            if hub.task is not None:
                hub.task.cancel()
        if not self._count:
            self._idle.set()

    def _hub_ended(self, hub: Hub, task: asyncio.Task[None]) -> None:
        self._forget(hub)  # a hub that failed or ended must not take new streams

    def _forget(self, hub: Hub) -> None:
        if self._hubs.get(hub.workspace_id) is hub:
            del self._hubs[hub.workspace_id]

    async def serve(self, stream: Stream, resume: Resume | None,
                    after: tuple[str, int] | None,
                    read: Callable[[], Awaitable[None]]) -> str:
        """Run a joined stream until the client goes, it is drained or cut; the outcome:
        ``"disconnected"``, ``"drained"`` (reconnect sent), ``"slow"`` or ``"closed"``."""
        async with anyio.create_task_group() as tg:
            stream.scope = tg.cancel_scope
            tg.start_soon(self._read, stream, read)
            try:
                await self.begin(stream, resume, after)
                await stream.pump()
            except OSError:  # the transport is gone (uvicorn's ClientDisconnected)
                stream.outcome = stream.outcome or "disconnected"
            tg.cancel_scope.cancel()
        stream.scope = None
        return stream.outcome or "closed"

    @staticmethod
    async def _read(stream: Stream, read: Callable[[], Awaitable[None]]) -> None:
        await read()
        stream.outcome = stream.outcome or "disconnected"
        if stream.scope is not None:
            stream.scope.cancel()

    async def begin(self, stream: Stream, resume: Resume | None,
                    after: tuple[str, int] | None) -> None:
        """Snapshot, or resume from ``resume`` with one merged delta when the bus allows."""
        hub = stream.hub
        if hub is None:
            return
        if after is not None:
            with anyio.move_on_after(RESUME_WAIT):
                await hub.reach(after[1], after[0])
        if resume is None or resume[0] is None:
            stream.start_over(views_dirty=resume is not None)
            return
        epoch, since = resume
        if epoch == hub.epoch:
            with anyio.move_on_after(RESUME_WAIT):
                await hub.reach(since, epoch)
        messages = None
        if epoch == hub.epoch and hub.seq >= since:
            try:
                messages = await self.service.bus.since(hub.workspace_id, epoch, since)
            except Exception:
                log.exception("reading the bus for a resume failed; sending a snapshot")
        if (messages is None or hub.views_seq >= since
                or any(m.kind == "views" for m in messages)):
            stream.start_over(views_dirty=True)
        else:
            stream.resume(hub.resume_keys(messages, stream.teammate))

    async def _reflect(self, workspace_id: int, position: int) -> tuple[str, int]:
        """Wait (bounded) until the counts reflect outbox position ``position``; the state's
        (epoch, seq) then."""
        await wait_for_position(self.service.state, self.service.store, workspace_id,
                                position, AFTER_WAIT)
        snapshot = await self.service.state.snapshot(workspace_id)
        return snapshot.epoch, snapshot.seq


def _number(text: str, name: str) -> int:
    text = text.strip()
    if not text.isdigit() or not text.isascii() or len(text) > _MAX_SEQ_DIGITS:
        raise ValidationError(f"expected a non-negative integer, got {text[:30]!r}", name)
    return int(text)


def _resume(epoch: str | None, since: str | None, name: str = "since") -> Resume | None:
    """(epoch, seq) to resume from; epoch None when the client named none (it then gets a
    snapshot: seqs compare only within one epoch)."""
    if since is None or not since.strip():
        if epoch is not None:
            raise ValidationError("epoch without since; expected ?epoch=E&since=S", "epoch")
        return None
    seq = _number(since, name)
    if epoch is not None and not _EPOCH.fullmatch(epoch):
        raise ValidationError(f"expected an epoch as sent in a snapshot, got {epoch[:30]!r}",
                              "epoch" if name == "since" else name)
    return epoch, seq
