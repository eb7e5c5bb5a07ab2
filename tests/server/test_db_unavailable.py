"""A locked database answers 503 with ``Retry-After`` and the JSON error shape, never 500;
once the lock is gone the same request succeeds and nothing half-written remains.

The lock is real: the stdlib ``sqlite3`` module holds ``BEGIN EXCLUSIVE`` on the store's file
while requests go through the real app under uvicorn.
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from starlette.requests import Request

from livecount.exceptions import StoreError, Unavailable
from livecount.server.errors import error_response, livecount_error

from .support import create_tenant, dump_tables, live_server, server_settings

pytestmark = pytest.mark.anyio


@contextlib.contextmanager
def exclusive_lock(path: Path) -> Iterator[None]:
    conn = sqlite3.connect(path, isolation_level=None, timeout=5)
    try:
        conn.execute("BEGIN EXCLUSIVE")
        try:
            yield
        finally:
            conn.execute("ROLLBACK")
    finally:
        conn.close()


def assert_busy(response: httpx.Response) -> None:
    assert response.status_code == 503, response.text
    assert response.headers["retry-after"] == "1"
    assert response.headers["content-type"].startswith("application/json")
    assert response.json() == {"error": {
        "code": "unavailable", "message": "the database is busy (locked); retry shortly"}}


async def test_a_locked_database_answers_503_with_retry_after(tmp_path: Path) -> None:
    db = tmp_path / "livecount.db"
    settings = server_settings(tmp_path, store_url=f"sqlite:///{db}?busy_timeout_ms=200")
    async with live_server(settings) as server, server.client() as client:
        tenant = await create_tenant(client, server.admin_token, teammates=1, teams=1)
        ann = tenant.people[0]
        response = await client.post(tenant.url("/conversations"), json={},
                                     headers=ann.headers)
        assert response.status_code == 201, response.text
        url = tenant.url(f"/conversations/{response.json()['id']}")
        patch = {"priority": True, "tags": ["vip"], "custom": {"tier": "gold"}}
        before = dump_tables(f"sqlite:///{db}")

        with exclusive_lock(db):
            assert_busy(await client.patch(url, json=patch, headers=ann.headers))
            assert_busy(await client.post(tenant.url("/conversations"), json={},
                                          headers=ann.headers))
            assert_busy(await client.post("/api/workspaces", json={"name": "Blocked"},
                                          headers=server.admin))
            # Reads go on under WAL: the caller can still see the (unchanged) conversation.
            response = await client.get(url, headers=ann.headers)
            assert response.status_code == 200 and response.json()["version"] == 1

        assert dump_tables(f"sqlite:///{db}") == before, "a refused write left rows behind"
        response = await client.patch(url, json=patch, headers=ann.headers)
        assert response.status_code == 200, response.text
        updated = response.json()
        assert (updated["version"], updated["priority"], updated["tags"], updated["custom"]) \
            == (2, True, ["vip"], {"tier": "gold"})
        assert (await client.get(url, headers=ann.headers)).json() == updated
        assert server.internal_errors == 0


def _request() -> Request:
    return Request({"type": "http", "method": "GET", "path": "/x", "headers": [],
                    "query_string": b"", "server": ("testserver", 80), "scheme": "http"})


async def test_every_503_carries_retry_after() -> None:
    own = await livecount_error(_request(), Unavailable("later", retry_after=7))
    assert own is not None and own.status_code == 503
    assert own.headers["retry-after"] == "7"
    default = await livecount_error(_request(), Unavailable("later"))
    assert default is not None and default.headers["retry-after"] == "1"
    # a 503 built without an exception (readiness, draining) gets the default too
    assert error_response(503, "unavailable", "draining").headers["retry-after"] == "1"
    assert error_response(503, "unavailable", "x", {"Retry-After": "30"}).headers[
        "retry-after"] == "30"
    # and no other status does
    for other in (await livecount_error(_request(), StoreError("bug")),
                  error_response(429, "too_many_requests", "slow down")):
        assert other is not None and "retry-after" not in other.headers
