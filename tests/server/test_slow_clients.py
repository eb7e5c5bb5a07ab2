"""Slow clients: a client that stops reading is cut after ``slow_client_timeout``, costs the
server a bounded amount of memory until then, and slows no one else.

The slow client is a raw TCP socket with a small receive buffer that completes the WebSocket
handshake (or the SSE request) and then never reads. The workspace has a view with a very
large filter, so every change of the view list is a ~100 KB ``views`` message: the kernel
buffers and uvicorn's transport buffer fill within a few messages, and the server's send
blocks — the situation the gateway must survive.
"""

from __future__ import annotations

import json
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import httpx
import pytest

from tests.server.stream_support import (
    Model,
    StreamClient,
    api_counts,
    eventually,
    gateway_of,
    raw_connect,
    read_to_eof,
    read_ws_close,
    read_ws_frame,
    stream_server,
    stream_settings,
)
from tests.server.support import LiveServer, Tenant, auth, create_tenant
from tests.server.test_stream import assert_converged, create_view, quiet

pytestmark = pytest.mark.anyio

#: 99 conditions of ~1000 characters: a ~100 KB filter, so a ~100 KB views message
HUGE = {"operator": "OR", "value": [
    {"field": "channel", "operator": "=", "value": f"c{i:02d}" + "x" * 990} for i in range(99)]}
TIMEOUT = 0.5


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[LiveServer]:
    settings = stream_settings(tmp_path, slow_client_timeout=TIMEOUT, flush_interval=0.01)
    async with stream_server(settings) as server:
        yield server


@pytest.fixture
async def tenant(server: LiveServer, http: httpx.AsyncClient) -> Tenant:
    tenant = await create_tenant(http, server.admin_token)
    await create_view(http, tenant, server.admin_token, "Huge", HUGE, "team_id")
    return tenant


def visible_counters(counts: dict[str, object]) -> int:
    return sum(max(1, len(v)) if isinstance(v, dict) else 1 for v in counts.values())


@pytest.mark.parametrize("kind", ["ws", "sse"])
async def test_a_client_that_stops_reading_is_cut_and_others_go_on(
        server: LiveServer, http: httpx.AsyncClient, tenant: Tenant, kind: str) -> None:
    gateway = gateway_of(server)
    admin, (p0, p1, p2) = server.admin_token, tenant.people
    renamed = await create_view(http, tenant, admin, "Renamed 0", {
        "field": "state", "operator": "=", "value": "open"}, "assignee_id")
    path = "ws" if kind == "ws" else "stream"
    async with StreamClient(server, "ws", tenant.id, p0.token, teammate=p0.id) as ws, \
            StreamClient(server, "sse", tenant.id, p1.token, teammate=p1.id) as sse:
        for client in (ws, sse):
            await client.wait_for(lambda m: m.seq >= 0)
        sock, rest = await raw_connect(
            server, f"/api/workspaces/{tenant.id}/{path}?token={p2.token}",
            websocket=kind == "ws")
        try:
            await eventually(lambda: gateway.connections == 3, 3, "the slow stream")
            hub = gateway.hub(tenant.id)
            assert hub is not None
            slow = next(s for s in hub.streams if s.teammate == p2.id)
            bound = visible_counters((await api_counts(http, tenant.id, p2.token))["counts"])
            most = 0
            renames = 0
            with anyio.fail_after(20):
                while gateway.slow_clients == 0:
                    renames += 1
                    response = await http.put(
                        tenant.url(f"/views/{renamed['id']}"), headers=auth(admin),
                        json={"name": f"Renamed {renames}", "filter": renamed["filter"],
                              "group_by": "assignee_id"})
                    assert response.status_code == 200, response.text
                    response = await http.post(
                        tenant.url("/conversations"), headers=p0.headers,
                        json={"assignee_id": p2.id, "team_id": tenant.teams[renames % 2]["id"],
                              "mentions": [p2.id]})
                    assert response.status_code == 201, response.text
                    most = max(most, slow.buffered)
            # on the wire: reading now drains the buffers, so the close gets out
            if kind == "ws":
                assert await read_ws_close(sock, bytearray(rest), 5) == (4000, "slow client")
            else:
                assert (await read_to_eof(sock, 5)).endswith(b"\r\n0\r\n\r\n")
            # what the server held for it stayed within one entry per visible counter and
            # view, plus a few messages, however much happened meanwhile
            assert renames >= 3 and most > 0
            assert most <= bound + 4, (most, bound)
            assert slow.outcome == "slow"
            await eventually(lambda: gateway.connections == 2 and slow not in hub.streams, 3,
                             "the slow stream to be dropped")
            # the others got every rename and converge
            await quiet(server)
            last = f"Renamed {renames}"
            for client in (ws, sse):
                await client.wait_for(lambda m: any(v["name"] == last for v in m.views or []),
                                      what="the last rename")
            await assert_converged(http, [ws, sse])
            assert gateway.connections == 2
        finally:
            sock.close()
    assert gateway.slow_clients == 1


async def test_an_idle_client_is_not_slow(tmp_path: Path) -> None:
    """No traffic is not slowness: an idle stream outlives the timeout many times over."""
    settings = stream_settings(tmp_path, slow_client_timeout=0.1, flush_interval=0.01)
    async with stream_server(settings) as server, server.client() as http:
        tenant = await create_tenant(http, server.admin_token)
        person = tenant.people[0]
        sock, _ = await raw_connect(server, f"/api/workspaces/{tenant.id}/ws?token="
                                    f"{person.token}", websocket=True)
        try:
            async with StreamClient(server, "sse", tenant.id, person.token) as client:
                await client.wait_for(lambda m: m.seq >= 0)
                await anyio.sleep(1.0)
                response = await http.post(tenant.url("/conversations"), json={},
                                           headers=person.headers)
                assert response.status_code == 201
                await quiet(server)
                await assert_converged(http, [client])
                assert gateway_of(server).slow_clients == 0
                assert gateway_of(server).connections == 2
        finally:
            sock.close()


def test_the_raw_socket_really_has_a_small_buffer() -> None:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) <= 16384


async def test_a_client_that_falls_behind_gets_conflated_deltas(tmp_path: Path) -> None:
    """Blocked for less than the timeout: what changed meanwhile is merged, per counter, into
    the next delta; once the client reads again it holds exactly the server's counts."""
    settings = stream_settings(tmp_path, slow_client_timeout=5.0, flush_interval=0.01)
    async with stream_server(settings) as server, server.client() as http:
        tenant = await create_tenant(http, server.admin_token)
        admin, (p0, _, p2) = server.admin_token, tenant.people
        await create_view(http, tenant, admin, "Huge", HUGE, "team_id")
        renamed = await create_view(http, tenant, admin, "Renamed", {
            "field": "state", "operator": "=", "value": "open"})
        # every write below makes a group of its own: a counter no later write touches
        await create_view(http, tenant, admin, "By tag", {
            "field": "state", "operator": "=", "value": "open"}, "tags")
        gateway = gateway_of(server)
        sock, rest = await raw_connect(
            server, f"/api/workspaces/{tenant.id}/ws?token={p2.token}", websocket=True)
        try:
            await eventually(lambda: gateway.connections == 1, 3, "the stream")
            hub = gateway.hub(tenant.id)
            assert hub is not None
            stream = next(iter(hub.streams))
            # fill the pipe with big views messages until a send blocks
            with anyio.fail_after(5):
                renames = 0
                while not stream.sending_since:
                    renames += 1
                    response = await http.put(
                        tenant.url(f"/views/{renamed['id']}"), headers=auth(admin),
                        json={"name": f"Renamed {renames}", "filter": renamed["filter"]})
                    assert response.status_code == 200, response.text
                    await anyio.sleep(0.02)
            writes = 40
            for i in range(writes):
                response = await http.post(
                    tenant.url("/conversations"), headers=p0.headers,
                    json={"assignee_id": [p2.id, p0.id, None][i % 3], "mentions": [p2.id],
                          "team_id": tenant.teams[i % 2]["id"], "tags": [f"t{i}"]})
                assert response.status_code == 201, response.text
            await quiet(server)
            assert stream.sending_since, "the stream should still be blocked"
            assert 0 < stream.buffered <= writes + 20
            # read everything
            model, buffer = Model(), bytearray(rest)
            while True:
                with anyio.move_on_after(0.5) as idle:
                    opcode, payload = await read_ws_frame(sock, buffer)
                if idle.cancelled_caught:
                    break
                assert opcode == 0x1, opcode
                model.apply(json.loads(payload))
            expected = await api_counts(http, tenant.id, p2.token)
            assert model.counts == expected["counts"]
            assert model.errors == []
            names = {v["id"]: v["name"] for v in model.views or []}
            assert names[renamed["id"]] == f"Renamed {renames}"
            deltas = model.of("delta")
            assert 0 < len(deltas) < writes / 2, len(deltas)
            assert gateway.slow_clients == 0 and gateway.connections == 1
        finally:
            sock.close()
