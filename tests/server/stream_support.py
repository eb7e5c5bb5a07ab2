"""Pieces of the stream tests: a live server configured for streams, real WebSocket and SSE
clients that apply what they receive, raw sockets that misbehave, and the three independent
answers to "what are the counts" (the API, SQL, the view lists).

The server is the real app (:func:`livecount.server.create_app`) under uvicorn in the test's
event loop, with the gateway's uvicorn options; on exit it drains the gateway first (as a
production shutdown must), then stops uvicorn.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import socket
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import anyio
import httpx
import uvicorn
import websockets
from starlette.applications import Starlette
from websockets.asyncio.client import ClientConnection, connect

from livecount.domain import NOBODY, now_us
from livecount.server import create_app
from livecount.server.gateway import Gateway, uvicorn_options
from livecount.service import Settings
from livecount.views import render_counts, visible_views
from tests.server.support import ADMIN_TOKEN, LiveServer, auth

__all__ = [
    "Model",
    "StreamClient",
    "api_counts",
    "eventually",
    "list_lengths",
    "raw_connect",
    "sql_counts",
    "stream_server",
    "stream_settings",
]


def stream_settings(tmp_path: Path, **overrides: Any) -> Settings:
    settings = Settings(store_url=f"sqlite:///{tmp_path}/livecount.db", admin_token=ADMIN_TOKEN,
                        relay_poll_interval=0.05, flush_interval=0.02, heartbeat_interval=30.0,
                        slow_client_timeout=5.0)
    return replace(settings, **overrides)


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Any:  # leave pytest's signal handlers alone
        yield


@contextlib.asynccontextmanager
async def stream_server(settings: Settings) -> AsyncIterator[LiveServer]:
    """Serve ``create_app(settings)`` on 127.0.0.1 until the block ends; drain, then stop."""
    app = create_app(settings)
    config = uvicorn.Config(app, host="127.0.0.1", port=0, lifespan="on", log_level="warning",
                            timeout_graceful_shutdown=5, **uvicorn_options(settings))
    server = _Server(config)
    task = asyncio.create_task(server.serve(), name="uvicorn-stream-test-server")
    try:
        while not server.started:
            if task.done():
                task.result()
                raise RuntimeError("the server stopped during start-up")
            await asyncio.sleep(0.005)
        host, port = server.servers[0].sockets[0].getsockname()[:2]
        yield LiveServer(base_url=f"http://{host}:{port}", ws_url=f"ws://{host}:{port}",
                         admin_token=ADMIN_TOKEN, service=app.state.service,
                         store_url=settings.store_url, app=app, server=server)
        assert int(app.state.internal_errors) == 0, "a request reached the 500 handler"
    finally:
        if server.started:
            await gateway_of(server).stop()
        server.should_exit = True
        await task


def gateway_of(server: LiveServer | uvicorn.Server) -> Gateway:
    app = server.app if isinstance(server, LiveServer) else server.config.app
    assert isinstance(app, Starlette)
    gateway: Gateway = app.state.gateway
    return gateway


async def eventually(check: Callable[[], Any], within: float = 5.0,
                     message: str = "condition") -> None:
    """Wait until ``check()`` is truthy (an async check is awaited); fail after ``within``
    seconds."""
    deadline = time.monotonic() + within
    while True:
        result = check()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {within} s waiting for {message}")
        await asyncio.sleep(0.02)


# -- what a client holds -----------------------------------------------------------------------


@dataclass
class Model:
    """A client's copy of the counts, built only from the messages it received, plus the
    protocol checks every message must pass (collected in ``errors``)."""

    counts: dict[str, Any] = field(default_factory=dict)
    seq: int = -1
    epoch: str = ""
    views: list[dict[str, Any]] | None = None
    messages: list[dict[str, Any]] = field(default_factory=list)
    view_ids_seen: set[int] = field(default_factory=set)
    errors: list[str] = field(default_factory=list)
    sse_ids: list[str] = field(default_factory=list)

    def apply(self, message: dict[str, Any]) -> None:
        self.messages.append(message)
        kind = message.get("type")
        if kind in ("snapshot", "delta"):
            if set(message) != {"type", "epoch", "seq", "counts"}:
                self.errors.append(f"bad {kind} keys: {sorted(message)}")
            seq, epoch = message["seq"], message.get("epoch")
            if not isinstance(epoch, str) or not epoch:
                self.errors.append(f"bad epoch {epoch!r}")
            elif kind == "delta" and epoch != self.epoch:
                self.errors.append(f"a delta of epoch {epoch} after {self.epoch}")
            if not isinstance(seq, int) or (seq < self.seq and epoch == self.epoch):
                self.errors.append(f"seq went from {self.seq} to {seq}")
            self.seq = seq
            self.epoch = epoch if isinstance(epoch, str) else ""
            self.view_ids_seen |= {int(k) for k in message["counts"]}
            if kind == "snapshot":
                self.counts = {}
            for key, value in message["counts"].items():
                self._set(key, value, merge=kind == "delta")
        elif kind == "views":
            if set(message) != {"type", "views"}:
                self.errors.append(f"bad views keys: {sorted(message)}")
            self.views = message["views"]
            self.view_ids_seen |= {v["id"] for v in self.views}
            listed = {str(v["id"]) for v in self.views}
            self.counts = {k: v for k, v in self.counts.items() if k in listed}
        elif kind == "reconnect":
            if set(message) != {"type", "reason", "retry_ms"} or not isinstance(
                    message["retry_ms"], int):
                self.errors.append(f"bad reconnect: {message}")
        else:
            self.errors.append(f"unknown message {message}")

    def _set(self, key: str, value: Any, merge: bool) -> None:
        known = self.counts.get(key)
        if isinstance(value, dict):
            if merge and isinstance(known, dict):
                for group, n in value.items():
                    if n:
                        known[group] = n
                    else:
                        known.pop(group, None)
            else:
                self.counts[key] = {g: n for g, n in value.items() if n}
        elif isinstance(value, int):
            self.counts[key] = value
        else:
            self.errors.append(f"bad count {key}: {value!r}")

    def of(self, kind: str) -> list[dict[str, Any]]:
        return [m for m in self.messages if m.get("type") == kind]


class StreamClient:
    """A real client of one transport ("ws" via ``websockets``, "sse" via ``httpx``) that
    applies every message to its :class:`Model`. Use as ``async with``: it owns one task."""

    def __init__(self, server: LiveServer, kind: str, workspace_id: int, token: str, *,
                 name: str = "", teammate: int | None = None, query: str = "",
                 headers: dict[str, str] | None = None, token_in: str = "query") -> None:
        self.server = server
        self.kind = kind
        self.workspace_id = workspace_id
        self.token = token
        self.teammate = teammate
        self.name = name or f"{kind}:{teammate}"
        self.query = query
        self.headers = dict(headers or {})
        self.token_in = token_in
        self.model = Model()
        self.closed = asyncio.Event()
        self.close_code: int | None = None
        self.close_reason = ""
        self.comments = 0  # SSE comment lines (heartbeats)
        self.retry: int | None = None  # SSE retry field
        self._stack = contextlib.AsyncExitStack()
        self._ws: ClientConnection | None = None

    def _url(self) -> str:
        path = "ws" if self.kind == "ws" else "stream"
        base = self.server.ws_url if self.kind == "ws" else self.server.base_url
        params = [p for p in (self.query,) if p]
        if self.token_in == "query":
            params.append(f"token={self.token}")
        suffix = f"?{'&'.join(params)}" if params else ""
        return f"{base}/api/workspaces/{self.workspace_id}/{path}{suffix}"

    def _headers(self) -> dict[str, str]:
        headers = dict(self.headers)
        if self.token_in == "header":
            headers.update(auth(self.token))
        return headers

    async def __aenter__(self) -> StreamClient:
        await self._stack.__aenter__()
        try:
            if self.kind == "ws":
                self._ws = await self._stack.enter_async_context(connect(
                    self._url(), additional_headers=self._headers(), proxy=None,
                    compression=None, max_size=None, open_timeout=5))
                reader = self._read_ws
            else:
                client = await self._stack.enter_async_context(
                    httpx.AsyncClient(timeout=httpx.Timeout(10, read=None), trust_env=False))
                response = await self._stack.enter_async_context(
                    client.stream("GET", self._url(), headers=self._headers()))
                if response.status_code != 200:
                    await response.aread()
                    raise httpx.HTTPStatusError(f"{response.status_code}: {response.text}",
                                                request=response.request, response=response)
                reader = self._reader_sse(response)
            tg = await self._stack.enter_async_context(anyio.create_task_group())
            self._stack.callback(tg.cancel_scope.cancel)
            tg.start_soon(reader)
        except BaseException:
            await self._stack.aclose()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._stack.aclose()

    async def _read_ws(self) -> None:
        assert self._ws is not None
        try:
            async for raw in self._ws:
                assert isinstance(raw, str), "binary frame"
                self.model.apply(json.loads(raw))
        except websockets.ConnectionClosed:
            pass
        finally:
            self.close_code = self._ws.close_code
            self.close_reason = self._ws.close_reason or ""
            self.closed.set()

    def _reader_sse(self, response: httpx.Response) -> Callable[[], Any]:
        async def read() -> None:
            data: list[str] = []
            event_id: str | None = None
            try:
                async for line in response.aiter_lines():
                    if line == "":
                        if data:
                            message = json.loads("\n".join(data))
                            if event_id is not None:
                                self.model.sse_ids.append(event_id)
                                if f"{message.get('epoch')}:{message.get('seq')}" != event_id:
                                    self.model.errors.append(f"id {event_id} != {message}")
                            elif message.get("type") in ("snapshot", "delta"):
                                self.model.errors.append(f"no id: {message}")
                            self.model.apply(message)
                        data, event_id = [], None
                    elif line.startswith(":"):
                        self.comments += 1
                    else:
                        name, _, value = line.partition(":")
                        value = value[1:] if value.startswith(" ") else value
                        if name == "data":
                            data.append(value)
                        elif name == "id":
                            event_id = value
                        elif name == "retry":
                            self.retry = int(value)
            except httpx.HTTPError:
                pass
            finally:
                self.closed.set()
        return read

    @property
    def counts(self) -> dict[str, Any]:
        return self.model.counts

    async def wait_for(self, predicate: Callable[[Model], bool], within: float = 5.0,
                       what: str = "a message") -> None:
        await eventually(lambda: predicate(self.model), within, f"{self.name}: {what}")


# -- the counts, three ways --------------------------------------------------------------------


async def api_counts(client: httpx.AsyncClient, workspace_id: int,
                     token: str) -> dict[str, Any]:
    response = await client.get(f"/api/workspaces/{workspace_id}/counts", headers=auth(token))
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


async def sql_counts(server: LiveServer, workspace_id: int,
                     teammate: int | None) -> dict[str, Any]:
    """A SQL recount of every view, composed for ``teammate`` (not the relay's state)."""
    store = server.service.store
    views = await store.list_views(workspace_id)
    recount = await store.recount(workspace_id, views, now_us())
    rendered: dict[str, Any] = render_counts(visible_views(views, teammate), recount.counts,
                                             teammate)
    return rendered


async def list_lengths(client: httpx.AsyncClient, workspace_id: int, token: str,
                       counts: dict[str, Any]) -> dict[str, Any]:
    """The length of every view's list (every group's, for grouped views, for the groups
    in ``counts``), paging through the HTTP list endpoint."""
    out: dict[str, Any] = {}
    for key, value in counts.items():
        groups = list(value) if isinstance(value, dict) else [None]
        lengths = {}
        for group in groups:
            n, cursor = 0, None
            while True:
                params: dict[str, Any] = {"limit": 7}
                if group is not None:
                    params["group"] = group
                if cursor is not None:
                    params["cursor"] = cursor
                response = await client.get(
                    f"/api/workspaces/{workspace_id}/views/{key}/conversations",
                    params=params, headers=auth(token))
                assert response.status_code == 200, response.text
                page = response.json()
                n += len(page["conversations"])
                cursor = page["next_cursor"]
                if cursor is None:
                    break
            lengths[group] = n
        out[key] = lengths if isinstance(value, dict) else lengths[None]
    return out


def me_of(teammate: int | None) -> int:
    return NOBODY if teammate is None else teammate


# -- raw sockets -------------------------------------------------------------------------------


async def raw_connect(server: LiveServer, path: str, *, websocket: bool,
                      rcvbuf: int = 4096) -> tuple[socket.socket, bytes]:
    """A TCP socket with a small receive buffer that sent a WebSocket handshake (or an SSE
    GET) for ``path`` and read the response head; the rest is up to the test (which must
    close it). Returns the socket and any bytes read past the head."""
    host, port = urlsplit(server.base_url).hostname, urlsplit(server.base_url).port
    assert host is not None and port is not None
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.setblocking(False)
        await loop.sock_connect(sock, (host, port))
        lines = [f"GET {path} HTTP/1.1", f"Host: {host}:{port}"]
        if websocket:
            key = base64.b64encode(os.urandom(16)).decode()
            lines += ["Upgrade: websocket", "Connection: Upgrade",
                      f"Sec-WebSocket-Key: {key}", "Sec-WebSocket-Version: 13"]
        else:
            lines += ["Accept: text/event-stream"]
        await loop.sock_sendall(sock, ("\r\n".join(lines) + "\r\n\r\n").encode())
        buffer = b""
        with anyio.fail_after(5):
            while b"\r\n\r\n" not in buffer:
                chunk = await loop.sock_recv(sock, 1024)
                if not chunk:
                    raise AssertionError(f"connection closed during the handshake: {buffer!r}")
                buffer += chunk
        head, _, rest = buffer.partition(b"\r\n\r\n")
        expected = b" 101 " if websocket else b" 200 "
        assert expected in head.split(b"\r\n")[0], head
        return sock, rest
    except BaseException:
        sock.close()
        raise


async def read_to_eof(sock: socket.socket, within: float) -> bytes:
    """Read until the peer closes; the last 64 KiB read. Fails after ``within`` s."""
    loop = asyncio.get_running_loop()
    tail = b""
    with anyio.fail_after(within):
        while chunk := await loop.sock_recv(sock, 65536):
            tail = (tail + chunk)[-65536:]
    return tail


async def read_ws_close(sock: socket.socket, buffer: bytearray,
                        within: float) -> tuple[int, str] | None:
    """Skip server frames until a close frame: its (code, reason); None on EOF first."""
    with anyio.fail_after(within):
        while True:
            try:
                opcode, payload = await read_ws_frame(sock, buffer)
            except EOFError:
                return None
            if opcode == 0x8:
                return int.from_bytes(payload[:2], "big"), payload[2:].decode()


async def read_ws_frame(sock: socket.socket, buffer: bytearray) -> tuple[int, bytes]:
    """One unmasked server frame: (opcode, payload)."""
    loop = asyncio.get_running_loop()

    async def need(n: int) -> None:
        while len(buffer) < n:
            chunk = await loop.sock_recv(sock, 65536)
            if not chunk:
                raise EOFError
            buffer.extend(chunk)

    await need(2)
    opcode, length, offset = buffer[0] & 0x0F, buffer[1] & 0x7F, 2
    if length == 126:
        await need(4)
        length, offset = int.from_bytes(buffer[2:4], "big"), 4
    elif length == 127:
        await need(10)
        length, offset = int.from_bytes(buffer[2:10], "big"), 10
    await need(offset + length)
    payload = bytes(buffer[offset:offset + length])
    del buffer[:offset + length]
    return opcode, payload
