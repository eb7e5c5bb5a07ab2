"""A real livecount server on a real socket, in the test's event loop, and tenants for it.

Plain module (not a conftest) so the server, stream and browser tests all import the same
pieces: :func:`live_server` runs ``uvicorn.Server`` as a task of the running loop (no thread),
:func:`create_tenant` makes a workspace with teammates and teams through the API.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import httpx
import uvicorn
from starlette.applications import Starlette

from livecount.server.app import Server, create_app, server_options
from livecount.service import Service, Settings

__all__ = [
    "ADMIN_TOKEN",
    "LiveServer",
    "Person",
    "Tenant",
    "auth",
    "create_tenant",
    "dump_tables",
    "live_server",
    "read_all",
    "server_settings",
]

ADMIN_TOKEN = "lc_admin_test-token"


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@dataclass
class LiveServer:
    base_url: str
    ws_url: str
    admin_token: str
    service: Service
    store_url: str
    app: Starlette
    server: uvicorn.Server

    @property
    def admin(self) -> dict[str, str]:
        return auth(self.admin_token)

    def client(self, **kwargs: Any) -> httpx.AsyncClient:
        """A client on this server (the caller closes it: ``async with``)."""
        return httpx.AsyncClient(base_url=self.base_url, timeout=10, **kwargs)

    @property
    def internal_errors(self) -> int:
        """How many requests reached the 500 handler (a bug every time)."""
        return int(self.app.state.internal_errors)


def server_settings(tmp_path: Path, **overrides: Any) -> Settings:
    settings = Settings(store_url=f"sqlite:///{tmp_path}/livecount.db", admin_token=ADMIN_TOKEN,
                        relay_poll_interval=0.05, flush_interval=0.02)
    return replace(settings, **overrides)


class _TestServer(Server):
    """The app's server (it drains the streams before stopping), minus the signal handlers:
    pytest keeps its own."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


@contextlib.asynccontextmanager
async def live_server(settings: Settings) -> AsyncIterator[LiveServer]:
    """Serve ``create_app(settings)`` on 127.0.0.1 (a free port) until the block ends."""
    app = create_app(settings)
    config = uvicorn.Config(app, host="127.0.0.1", port=0, lifespan="on", log_level="warning",
                            timeout_graceful_shutdown=5, **server_options(settings))
    server = _TestServer(config, app)
    task = asyncio.create_task(server.serve(), name="uvicorn-test-server")
    try:
        while not server.started:
            if task.done():
                task.result()  # raises what stopped the start-up
                raise RuntimeError("the server stopped during start-up")
            await asyncio.sleep(0.005)
        sock = server.servers[0].sockets[0]
        host, port = sock.getsockname()[:2]
        assert sock.family == socket.AF_INET
        yield LiveServer(base_url=f"http://{host}:{port}", ws_url=f"ws://{host}:{port}",
                         admin_token=settings.admin_token or "", service=app.state.service,
                         store_url=settings.store_url, app=app, server=server)
    finally:
        server.should_exit = True
        await task


@dataclass
class Person:
    id: int
    name: str
    email: str
    token: str

    @property
    def headers(self) -> dict[str, str]:
        return auth(self.token)


@dataclass
class Tenant:
    id: int
    name: str
    people: list[Person] = field(default_factory=list)
    teams: list[dict[str, Any]] = field(default_factory=list)

    def url(self, path: str = "") -> str:
        return f"/api/workspaces/{self.id}{path}"


async def create_tenant(client: httpx.AsyncClient, admin_token: str, name: str = "Acme",
                        teammates: int = 3, teams: int = 2) -> Tenant:
    """A workspace with ``teammates`` teammates and ``teams`` teams (made by the admin; team i
    has every teammate j with j % teams == i)."""
    headers = auth(admin_token)
    response = await client.post("/api/workspaces", json={"name": name}, headers=headers)
    assert response.status_code == 201, response.text
    tenant = Tenant(id=response.json()["id"], name=name)
    for i in range(teammates):
        response = await client.post(
            tenant.url("/teammates"), headers=headers,
            json={"name": f"{name} mate {i}", "email": f"mate{i}@{name.lower()}.example"})
        assert response.status_code == 201, response.text
        tenant.people.append(Person(**response.json()))
    for i in range(teams):
        members = [p.id for j, p in enumerate(tenant.people) if j % teams == i]
        response = await client.post(tenant.url("/teams"), headers=headers,
                                     json={"name": f"{name} team {i}", "member_ids": members})
        assert response.status_code == 201, response.text
        tenant.teams.append(response.json())
    return tenant


def dump_tables(store_url: str) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of every table of a SQLite store, sorted: two dumps compare equal exactly
    when nothing was written. Opens its own read-only connection and closes it."""
    import sqlite3

    path = store_url.removeprefix("sqlite:///")
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        names = [r[0] for r in conn.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")]
        return {name: sorted(conn.execute(f'SELECT * FROM "{name}"').fetchall(), key=repr)
                for name in names}
    finally:
        conn.close()


async def read_all(client: httpx.AsyncClient, tenant: Tenant, headers: dict[str, str],
                   view_id: int, group: str | None = None, limit: int = 7
                   ) -> list[dict[str, Any]]:
    """Every item of a view's list, following next_cursor page by page."""
    items: list[dict[str, Any]] = []
    params: dict[str, Any] = {"limit": limit}
    if group is not None:
        params["group"] = group
    for _ in range(10_000):
        response = await client.get(tenant.url(f"/views/{view_id}/conversations"),
                                    params=params, headers=headers)
        assert response.status_code == 200, response.text
        page = response.json()
        assert len(page["conversations"]) <= limit
        items += page["conversations"]
        if page["next_cursor"] is None:
            return items
        assert page["conversations"], "a page with a next_cursor must not be empty"
        params["cursor"] = page["next_cursor"]
    raise AssertionError("pagination does not end")
