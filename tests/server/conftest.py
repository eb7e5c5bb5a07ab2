"""Fixtures of the server tests: a live server per test, and a client on it; for the stream
tests, a server with the gateway's settings (a module may configure its own) and a client."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from .stream_support import stream_server, stream_settings
from .support import LiveServer, Tenant, create_tenant, server_settings
from .support import live_server as _live_server

__all__: list[str] = []


@pytest.fixture
async def live_server(tmp_path: Path) -> AsyncIterator[LiveServer]:
    """A real server (uvicorn, in this test's event loop) on a fresh SQLite store. Fails the
    test if any request reached the 500 handler."""
    async with _live_server(server_settings(tmp_path)) as server:
        yield server
        assert server.internal_errors == 0, "a request reached the 500 handler"


@pytest.fixture
async def client(live_server: LiveServer) -> AsyncIterator[httpx.AsyncClient]:
    async with live_server.client() as client:
        yield client


@pytest.fixture
async def tenant(live_server: LiveServer, client: httpx.AsyncClient) -> Tenant:
    """Workspace "Acme": three teammates, two teams."""
    return await create_tenant(client, live_server.admin_token)


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[LiveServer]:
    """A real server with the stream gateway's uvicorn options (see :mod:`.stream_support`);
    drained on exit."""
    async with stream_server(stream_settings(tmp_path)) as server:
        yield server


@pytest.fixture
async def http(server: LiveServer) -> AsyncIterator[httpx.AsyncClient]:
    """A client on ``server``."""
    async with server.client() as client:
        yield client
