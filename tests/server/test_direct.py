"""The direct stream paths (:mod:`livecount.server.direct`): once its first message is
decided, a connection leaves ASGI and the hub writes to its transport. What the ASGI side
used to take care of is now theirs: noticing a client that left, reading what a client
sends, closing a client that never reads, and surviving a transport that raises.

Each test is a regression of a leak or a wedge found in review; each fails on the code
before its fix.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from websockets.asyncio.client import connect

from livecount.server.direct import DirectStream
from livecount.server.sse import DirectSseStream
from tests.server.stream_support import (
    StreamClient,
    eventually,
    gateway_of,
    raw_connect,
    stream_server,
    stream_settings,
)
from tests.server.support import LiveServer, Tenant, create_tenant
from tests.server.test_slow_clients import HUGE
from tests.server.test_stream import create_view

pytestmark = pytest.mark.anyio


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[LiveServer]:
    # no slow-client cut and no heartbeat during a test: only what the test does closes
    settings = stream_settings(tmp_path, slow_client_timeout=60.0, heartbeat_interval=60.0)
    async with stream_server(settings) as server:
        yield server


@pytest.fixture
async def tenant(server: LiveServer, http: httpx.AsyncClient) -> Tenant:
    return await create_tenant(http, server.admin_token)


async def write(http: httpx.AsyncClient, tenant: Tenant) -> None:
    person = tenant.people[0]
    response = await http.post(tenant.url("/conversations"), headers=person.headers,
                               json={"assignee_id": person.id})
    assert response.status_code == 201, response.text


@pytest.mark.parametrize("kind", ["ws", "sse"])
async def test_a_client_gone_while_its_first_message_is_decided_leaves_nothing(
        server: LiveServer, http: httpx.AsyncClient, tenant: Tenant, kind: str) -> None:
    """A resume ahead of the hub waits (up to a second) for the hub to catch up before the
    first message; a client that leaves meanwhile must not stay attached to the hub, hold
    its admission slot or (SSE) keep its call waiting."""
    gateway = gateway_of(server)
    admission = server.app.state.admission
    person = tenant.people[1]
    async with StreamClient(server, "ws", tenant.id, person.token, teammate=person.id) as held:
        await held.wait_for(lambda m: m.seq >= 0)
        assert gateway.connections == 1
        slots = admission.active
        path = "ws" if kind == "ws" else "stream"
        sock, _ = await raw_connect(
            server, f"/api/workspaces/{tenant.id}/{path}?token={person.token}"
                    f"&epoch={held.model.epoch}&since={held.model.seq + 1000}",
            websocket=kind == "ws")
        await eventually(lambda: gateway.connections == 2, 2, "the second stream to join")
        sock.close()  # while the gateway still waits for the hub to reach `since`
        # the wait ends after a second; then nothing of the second stream may remain
        await eventually(lambda: gateway.connections == 1 and admission.active == slots, 4,
                         "the stream of the client that left to be dropped")
        hub = gateway.hub(tenant.id)
        assert hub is not None and len(hub.streams) == 1
        await write(http, tenant)  # and the hub goes on for the client still there
        await held.wait_for(lambda m: len(m.of("delta")) >= 1, what="a delta")
    await eventually(lambda: gateway.connections == 0 and admission.active == slots - 1, 3,
                     "every stream to end")


async def test_messages_from_the_client_after_detach_do_not_stop_reading(
        server: LiveServer, http: httpx.AsyncClient, tenant: Tenant) -> None:
    """The protocol says nothing about client messages; they are discarded. What must not
    happen is what uvicorn does for an ASGI app that does not read: pause reading until the
    app takes the message — after detach nobody ever would, so pongs and the close frame
    would never be read either."""
    person = tenant.people[0]
    url = f"{server.ws_url}/api/workspaces/{tenant.id}/ws?token={person.token}"
    async with connect(url) as ws:
        while json.loads(await asyncio.wait_for(ws.recv(), 5))["type"] != "snapshot":
            pass  # attached once the snapshot is out
        for i in range(20):
            await ws.send(f"hello {i}")
        pong = await ws.ping()
        await asyncio.wait_for(pong, 3)  # read on
        await write(http, tenant)
        message = json.loads(await asyncio.wait_for(ws.recv(), 5))
        assert message["type"] == "delta", message


async def test_a_close_the_client_never_reads_is_aborted(
        server: LiveServer, http: httpx.AsyncClient, tenant: Tenant) -> None:
    """A close frame behind a full buffer can never leave: after the close timeout the
    connection is aborted. A plain ``transport.close()`` waits for the buffer to drain —
    forever for a client that does not read — holding the socket and the hub's stream."""
    gateway = gateway_of(server)
    admin, person = server.admin_token, tenant.people[2]
    view = await create_view(http, tenant, admin, "Huge 0", HUGE, None)
    sock, _ = await raw_connect(server, f"/api/workspaces/{tenant.id}/ws?token={person.token}",
                                websocket=True)
    try:
        await eventually(lambda: gateway.connections == 1, 3, "the stream")
        hub = gateway.hub(tenant.id)
        assert hub is not None
        stream = next(iter(hub.streams))
        assert isinstance(stream, DirectStream)
        renames = 0
        while not stream.sending_since:  # ~100 KB views messages until the transport pauses
            renames += 1
            assert renames < 200, "the transport never paused"
            response = await http.put(tenant.url(f"/views/{view['id']}"),
                                      headers={"Authorization": f"Bearer {admin}"},
                                      json={"name": f"Huge {renames}", "filter": HUGE})
            assert response.status_code == 200, response.text
            await asyncio.sleep(0.02)
        protocol = stream.protocol
        protocol.close_timeout = 0.3
        protocol.close_with(1012, "server shutting down")  # as after a drain's reconnect
        await eventually(lambda: gateway.connections == 0, 3,
                         "the unread close to be aborted")
        assert stream.outcome in ("disconnected", "drained"), stream.outcome
    finally:
        sock.close()


class _Failing:
    """A transport whose writes raise (uvloop raises on a transport closed under it)."""

    def __init__(self, transport: Any) -> None:
        self._transport = transport

    def write(self, data: bytes) -> None:
        raise RuntimeError("write on a broken transport")

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


@pytest.mark.parametrize("kind", ["ws", "sse"])
async def test_a_failing_write_cuts_one_connection_not_the_hub(
        server: LiveServer, http: httpx.AsyncClient, tenant: Tenant, kind: str) -> None:
    gateway = gateway_of(server)
    p0, p1 = tenant.people[0], tenant.people[1]
    async with StreamClient(server, kind, tenant.id, p0.token, teammate=p0.id) as broken, \
            StreamClient(server, kind, tenant.id, p1.token, teammate=p1.id) as fine:
        for client in (broken, fine):
            await client.wait_for(lambda m: m.seq >= 0)
        hub = gateway.hub(tenant.id)
        assert hub is not None
        victim = next(s for s in hub.streams if s.teammate == p0.id)
        assert isinstance(victim, (DirectStream, DirectSseStream))
        victim.protocol.transport = _Failing(victim.protocol.transport)
        for _ in range(3):
            await write(http, tenant)
        await eventually(lambda: victim not in hub.streams, 3, "the broken stream to end")
        await fine.wait_for(lambda m: len(m.of("delta")) >= 1, what="a delta")
        assert hub.task is not None and not hub.task.done()
        seen = len(fine.model.of("delta"))
        await write(http, tenant)  # the hub still ticks
        await fine.wait_for(lambda m: len(m.of("delta")) > seen, what="the next delta")
        assert gateway.connections == 1

