"""The live stream, end to end over real sockets: WebSocket (``websockets``) and SSE (``httpx``)
clients against the real app under uvicorn.

The differential test is the heart: clients of several teammates (one with a personal view,
the admin, another workspace) apply snapshot + deltas while concurrent writers change
conversations and views; once quiet, every client's counts equal ``GET /counts`` for its
caller, which equals a SQL recount and the lengths of the view lists.
"""

from __future__ import annotations

import contextlib
import json
import random
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
import websockets
from websockets.asyncio.client import connect

from livecount.bus import BusMessage, MemoryBus
from livecount.server import hub as hub_module
from tests.server.stream_support import (
    Model,
    StreamClient,
    api_counts,
    eventually,
    gateway_of,
    list_lengths,
    raw_connect,
    read_ws_frame,
    sql_counts,
    stream_server,
    stream_settings,
)
from tests.server.support import LiveServer, Tenant, auth, create_tenant

pytestmark = pytest.mark.anyio

TRANSPORTS = ["ws", "sse"]
OPEN_MENTIONS = {"operator": "AND", "value": [
    {"field": "state", "operator": "=", "value": "open"},
    {"field": "mentions", "operator": "contains", "value": "$me"}]}
VIP = {"field": "tags", "operator": "contains", "value": "vip"}
BILLING = {"field": "tags", "operator": "contains", "value": "billing"}
MINE = {"field": "assignee_id", "operator": "=", "value": "$me"}


@pytest.fixture
async def tenant(server: LiveServer, http: httpx.AsyncClient) -> Tenant:
    return await create_tenant(http, server.admin_token)


async def create_view(http: httpx.AsyncClient, tenant: Tenant, token: str, name: str,
                      filter: dict[str, Any], group_by: str | None = None,
                      personal: bool = False) -> dict[str, Any]:
    body: dict[str, Any] = {"name": name, "filter": filter, "personal": personal}
    if group_by is not None:
        body["group_by"] = group_by
    response = await http.post(tenant.url("/views"), json=body, headers=auth(token))
    assert response.status_code == 201, response.text
    view: dict[str, Any] = response.json()
    return view


def random_body(rng: random.Random, tenant: Tenant) -> dict[str, Any]:
    people = [p.id for p in tenant.people]
    teams = [t["id"] for t in tenant.teams]
    return {
        "state": rng.choice(["open", "open", "closed", "snoozed"]),
        "assignee_id": rng.choice([None, *people]),
        "team_id": rng.choice([None, *teams]),
        "tags": rng.sample(["vip", "billing", "bug"], rng.randint(0, 2)),
        "mentions": rng.sample(people, rng.randint(0, 2)),
        "priority": rng.random() < 0.3,
    }


def random_patch(rng: random.Random, tenant: Tenant) -> dict[str, Any]:
    body = random_body(rng, tenant)
    patch = {k: body[k] for k in rng.sample(sorted(body), rng.randint(1, 3))}
    if patch.get("state") == "snoozed":
        patch["snoozed_until"] = "2100-01-01T00:00:00Z"
    return patch


async def write(http: httpx.AsyncClient, tenant: Tenant, rng: random.Random, ids: list[int],
                count: int) -> None:
    """``count`` random creates and patches, as random teammates of ``tenant``."""
    for _ in range(count):
        person = rng.choice(tenant.people)
        if len(ids) < 3 or rng.random() < 0.35:
            body = random_body(rng, tenant)
            if body["state"] == "snoozed":
                body["snoozed_until"] = "2100-01-01T00:00:00Z"
            response = await http.post(tenant.url("/conversations"), json=body,
                                       headers=person.headers)
            assert response.status_code == 201, response.text
            ids.append(response.json()["id"])
        else:
            response = await http.patch(tenant.url(f"/conversations/{rng.choice(ids)}"),
                                        json=random_patch(rng, tenant), headers=person.headers)
            assert response.status_code in (200, 409), response.text


async def quiet(server: LiveServer) -> None:
    await server.service.relay.sync()
    await anyio.sleep(5 * server.service.settings.flush_interval)


async def assert_converged(http: httpx.AsyncClient, clients: list[StreamClient]) -> None:
    """Every client's counts == GET /counts of its caller (waiting for the last flush)."""
    for client in clients:
        expected = (await api_counts(http, client.workspace_id, client.token))["counts"]
        def equal(model: Model, expected: dict[str, Any] = expected) -> bool:
            return model.counts == expected

        try:
            await client.wait_for(equal, within=5, what="counts equal to GET /counts")
        except AssertionError:
            assert client.counts == expected, client.name
        assert client.model.errors == [], client.name


# -- snapshot on connect -----------------------------------------------------------------------


@pytest.mark.parametrize("kind", TRANSPORTS)
@pytest.mark.parametrize("token_in", ["query", "header"])
async def test_snapshot_on_connect_is_get_counts(server: LiveServer, http: httpx.AsyncClient,
                                                 tenant: Tenant, kind: str,
                                                 token_in: str) -> None:
    owner, other = tenant.people[0], tenant.people[1]
    personal = await create_view(http, tenant, owner.token, "Mine", OPEN_MENTIONS, "tags",
                                 personal=True)
    await create_view(http, tenant, server.admin_token, "VIP", VIP, "assignee_id")
    await write(http, tenant, random.Random(1), [], 25)
    await quiet(server)
    callers = [(owner.token, owner.id), (other.token, other.id), (server.admin_token, None)]
    for token, teammate in callers:
        async with StreamClient(server, kind, tenant.id, token, teammate=teammate,
                                token_in=token_in) as client:
            await client.wait_for(lambda m: bool(m.messages))
            first = client.model.messages[0]
            expected = await api_counts(http, tenant.id, token)
            assert first == {"type": "snapshot", "epoch": server.service.state.epoch,
                             "seq": expected["seq"], "counts": expected["counts"]}
            assert (str(personal["id"]) in first["counts"]) == (teammate == owner.id)
            assert any(isinstance(v, dict) and v for v in first["counts"].values())


# -- the differential test ---------------------------------------------------------------------


async def test_clients_converge_on_every_count(server: LiveServer, http: httpx.AsyncClient,
                                               tenant: Tenant) -> None:
    admin = server.admin_token
    other = await create_tenant(http, admin, name="Globex", teammates=2, teams=1)
    p0, p1, p2 = tenant.people
    personal0 = await create_view(http, tenant, p0.token, "My mentions", OPEN_MENTIONS, "tags",
                                  personal=True)
    vip = await create_view(http, tenant, admin, "VIP", VIP, "assignee_id")
    rng = random.Random(7)
    ids: list[int] = []
    other_ids: list[int] = []
    await write(http, tenant, rng, ids, 10)
    await quiet(server)
    specs = [("ws", p0, "query"), ("sse", p0, "header"), ("ws", p1, "header"),
             ("sse", p2, "query"), ("ws", None, "query"), ("sse", None, "header")]
    clients = [StreamClient(server, kind, tenant.id, who.token if who else admin,
                            teammate=who.id if who else None, token_in=token_in,
                            name=f"{kind}:{who.name if who else 'admin'}")
               for kind, who, token_in in specs]
    outsider = StreamClient(server, "ws", other.id, other.people[0].token,
                            teammate=other.people[0].id, name="ws:globex")
    created: dict[str, Any] = {}

    async def change_views() -> None:
        await anyio.sleep(0.05)
        created["billing"] = await create_view(http, tenant, admin, "Billing", BILLING,
                                               "team_id")
        created["mine1"] = await create_view(http, tenant, p1.token, "Mine", MINE,
                                             personal=True)
        await anyio.sleep(0.05)
        response = await http.put(tenant.url(f"/views/{created['billing']['id']}"),
                                  json={"name": "Billing (all)", "filter": BILLING,
                                        "group_by": "priority"}, headers=auth(admin))
        assert response.status_code == 200, response.text
        response = await http.delete(tenant.url(f"/views/{vip['id']}"), headers=auth(admin))
        assert response.status_code == 204, response.text

    async with contextlib.AsyncExitStack() as stack:
        for client in [*clients, outsider]:
            await stack.enter_async_context(client)
        for client in [*clients, outsider]:
            await client.wait_for(lambda m: m.seq >= 0, what="the snapshot")
        async with anyio.create_task_group() as tg:
            for seed in range(3):
                tg.start_soon(write, http, tenant, random.Random(seed), ids, 40)
            tg.start_soon(write, http, other, random.Random(99), other_ids, 15)
            tg.start_soon(change_views)
        await quiet(server)
        await assert_converged(http, [*clients, outsider])

        people = {None: admin, p0.id: p0.token, p1.id: p1.token, p2.id: p2.token}
        for teammate, token in people.items():
            expected = await api_counts(http, tenant.id, token)
            assert expected["counts"] == await sql_counts(server, tenant.id, teammate)
            assert expected["counts"] == await list_lengths(http, tenant.id, token,
                                                            expected["counts"])
        # both connections of one teammate agree, and saw some deltas on the way
        assert clients[0].counts == clients[1].counts
        for client in clients:
            assert len(client.model.of("delta")) > 3, client.name

        a_views = {v.id for v in await server.service.store.list_views(tenant.id)} | {
            vip["id"]}
        b_views = {v.id for v in await server.service.store.list_views(other.id)}
        mine1 = created["mine1"]["id"]
        for client in clients:
            seen = client.model.view_ids_seen
            assert seen <= a_views, client.name
            assert (personal0["id"] in seen) == (client.teammate == p0.id), client.name
            assert (mine1 in seen) == (client.teammate == p1.id), client.name
            assert created["billing"]["id"] in seen
            views = client.model.views
            assert views is not None, f"{client.name} got no views message"
            names = {v["name"] for v in views}
            assert "Billing (all)" in names and "VIP" not in names, client.name
        assert outsider.model.view_ids_seen <= b_views
        assert outsider.model.views is None  # nothing changed in its workspace's views


# -- views messages ----------------------------------------------------------------------------


async def test_views_messages_follow_view_changes(server: LiveServer, http: httpx.AsyncClient,
                                                  tenant: Tenant) -> None:
    p0, p1, _ = tenant.people
    admin = server.admin_token
    await write(http, tenant, random.Random(3), [], 15)
    await quiet(server)
    async with StreamClient(server, "ws", tenant.id, p0.token, teammate=p0.id) as c0, \
            StreamClient(server, "sse", tenant.id, p1.token, teammate=p1.id) as c1, \
            StreamClient(server, "ws", tenant.id, admin, name="admin") as ca:
        clients = [c0, c1, ca]
        for client in clients:
            await client.wait_for(lambda m: m.seq >= 0)

        # a personal view: its owner only
        mine = await create_view(http, tenant, p0.token, "Mine", MINE, personal=True)
        await c0.wait_for(lambda m: str(mine["id"]) in m.counts, what="the personal view")
        await quiet(server)
        assert [v["id"] for v in c0.model.of("views")[-1]["views"]].count(mine["id"]) == 1
        assert c1.model.of("views") == [] and ca.model.of("views") == []

        # a shared, grouped view: everyone, the list first, then its counts
        billing = await create_view(http, tenant, admin, "Billing", BILLING, "team_id")
        key = str(billing["id"])
        for client in clients:
            await client.wait_for(lambda m: key in m.counts, what="the shared view's counts")
            kinds = [m["type"] for m in client.model.messages]
            listed = next(i for i, m in enumerate(client.model.messages)
                          if m["type"] == "views" and any(v["id"] == billing["id"]
                                                          for v in m["views"]))
            counted = next(i for i, m in enumerate(client.model.messages)
                           if key in m.get("counts", {}))
            assert listed < counted, kinds
        await assert_converged(http, clients)
        wire = next(v for v in c1.model.views or [] if v["id"] == billing["id"])
        assert wire == {"id": billing["id"], "name": "Billing", "filter": BILLING,
                        "group_by": "team_id", "owner_id": None, "personal": False,
                        "position": billing["position"], "version": 1}
        assert all(v["owner_id"] in (None, p1.id) for v in c1.model.views or [])

        # views that count nothing change no counter: the view list and their (empty)
        # counts must still reach everyone
        nothing = {"field": "tags", "operator": "contains", "value": "no such tag"}
        empty = await create_view(http, tenant, admin, "Empty", nothing)
        empty_groups = await create_view(http, tenant, admin, "Empty groups", nothing,
                                         "team_id")
        for client in clients:
            await client.wait_for(lambda m: m.counts.get(str(empty["id"])) == 0 and m.counts.get(
                str(empty_groups["id"])) == {}, what="the empty views")
        response = await http.put(tenant.url(f"/views/{empty_groups['id']}"),
                                  headers=auth(admin), json={"name": "Empty", "filter": nothing})
        assert response.status_code == 200, response.text
        for client in clients:
            await client.wait_for(lambda m: m.counts.get(str(empty_groups["id"])) == 0,
                                  what="the regrouped empty view")
        await assert_converged(http, clients)

        # rename (and regroup), then delete
        response = await http.put(tenant.url(f"/views/{billing['id']}"), headers=auth(admin),
                                  json={"name": "Money", "filter": BILLING})
        assert response.status_code == 200, response.text
        for client in clients:
            await client.wait_for(lambda m: any(v["name"] == "Money" for v in m.views or []),
                                  what="the rename")
        await assert_converged(http, clients)
        assert all(isinstance(c.counts[key], int) for c in clients)

        response = await http.delete(tenant.url(f"/views/{billing['id']}"),
                                     headers=auth(admin))
        assert response.status_code == 204
        for client in clients:
            await client.wait_for(lambda m: key not in m.counts and all(
                v["id"] != billing["id"] for v in m.views or []), what="the delete")
        await assert_converged(http, clients)


# -- refusals ----------------------------------------------------------------------------------


async def refused(server: LiveServer, kind: str, workspace_id: int, query: str = "",
                  headers: dict[str, str] | None = None) -> tuple[int, dict[str, Any]]:
    """The status and JSON body of a refused stream request."""
    if kind == "sse":
        async with server.client() as client:
            response = await client.get(f"/api/workspaces/{workspace_id}/stream?{query}",
                                        headers=headers)
            return response.status_code, response.json()
    url = f"{server.ws_url}/api/workspaces/{workspace_id}/ws?{query}"
    with pytest.raises(websockets.InvalidStatus) as info:
        async with connect(url, additional_headers=headers or {}, proxy=None, open_timeout=5):
            pass
    denial = info.value.response
    body: dict[str, Any] = json.loads(denial.body or b"{}")
    return denial.status_code, body


@pytest.mark.parametrize("kind", TRANSPORTS)
async def test_refusals(server: LiveServer, http: httpx.AsyncClient, tenant: Tenant,
                        kind: str) -> None:
    other = await create_tenant(http, server.admin_token, name="Globex", teammates=1, teams=1)
    stranger = other.people[0].token
    mine = tenant.people[0].token
    cases = [
        ("", None, tenant.id, 401, "unauthorized"),
        ("token=nope", None, tenant.id, 401, "unauthorized"),
        ("", auth("nope"), tenant.id, 401, "unauthorized"),
        (f"token={stranger}", None, tenant.id, 403, "forbidden"),
        ("", auth(stranger), tenant.id, 403, "forbidden"),
        (f"token={stranger}", None, 999_999, 403, "forbidden"),
        (f"token={server.admin_token}", None, 999_999, 404, "not_found"),
        (f"token={mine}&since=abc", None, tenant.id, 400, "invalid"),
        (f"token={mine}&since=-1", None, tenant.id, 400, "invalid"),
        (f"token={mine}&since=1e3", None, tenant.id, 400, "invalid"),
        (f"token={mine}&epoch=a:b&since=3", None, tenant.id, 400, "invalid"),
        (f"token={mine}&epoch=abc", None, tenant.id, 400, "invalid"),
        (f"token={mine}&after=x", None, tenant.id, 400, "invalid"),
        (f"token={mine}&after=999999999", None, tenant.id, 400, "invalid"),
    ]
    for query, headers, workspace_id, status, code in cases:
        got, body = await refused(server, kind, workspace_id, query, headers)
        assert (got, body["error"]["code"]) == (status, code), (query, headers, body)
        assert isinstance(body["error"]["message"], str) and body["error"]["message"]
        # never another tenant's data
        assert "counts" not in json.dumps(body)
    assert gateway_of(server).connections == 0
    assert gateway_of(server).hubs == 0


async def test_sse_refuses_a_malformed_last_event_id(server: LiveServer,
                                                     tenant: Tenant) -> None:
    headers = {**tenant.people[0].headers, "Last-Event-ID": "12abc"}
    status, body = await refused(server, "sse", tenant.id, headers=headers)
    assert (status, body["error"]["code"]) == (400, "invalid")


async def test_sse_head_answers_headers_only(server: LiveServer, http: httpx.AsyncClient,
                                            tenant: Tenant) -> None:
    response = await http.head(tenant.url("/stream"), headers=tenant.people[0].headers)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    assert response.content == b""
    assert (await http.head(tenant.url("/stream"))).status_code == 401
    assert gateway_of(server).connections == 0


# -- drain -------------------------------------------------------------------------------------


async def test_stop_sends_reconnect_and_drains(server: LiveServer, http: httpx.AsyncClient,
                                               tenant: Tenant) -> None:
    p0, p1, _ = tenant.people
    gateway = gateway_of(server)
    async with StreamClient(server, "ws", tenant.id, p0.token) as ws, \
            StreamClient(server, "sse", tenant.id, p1.token) as sse:
        for client in (ws, sse):
            await client.wait_for(lambda m: m.seq >= 0)
        assert gateway.connections == 2 and gateway.hubs == 1
        with anyio.fail_after(5):
            await gateway.stop()
        assert gateway.connections == 0 and gateway.hubs == 0
        for client in (ws, sse):
            with anyio.fail_after(5):
                await client.closed.wait()
            last = client.model.messages[-1]
            assert last["type"] == "reconnect" and last["reason"] == "server shutting down"
            assert 1000 <= last["retry_ms"] <= 2000
            assert client.model.errors == []
        assert (ws.close_code, ws.close_reason) == (1012, "server shutting down")
        assert sse.retry == sse.model.messages[-1]["retry_ms"]
        # no new streams while draining
        assert (await refused(server, "sse", tenant.id, f"token={p0.token}"))[0] == 503
        assert (await refused(server, "ws", tenant.id, f"token={p0.token}"))[0] == 503


# -- heartbeats --------------------------------------------------------------------------------


async def test_heartbeats(tmp_path: Path) -> None:
    settings = stream_settings(tmp_path, heartbeat_interval=0.1)
    async with stream_server(settings) as server, server.client() as http:
        tenant = await create_tenant(http, server.admin_token)
        token = tenant.people[0].token
        async with StreamClient(server, "sse", tenant.id, token) as sse:
            await eventually(lambda: sse.comments >= 3, 3, "SSE ping comments")
            assert [m["type"] for m in sse.model.messages] == ["snapshot"]

        # WebSocket: protocol pings; a peer that never answers them is dropped
        sock, rest = await raw_connect(server, f"/api/workspaces/{tenant.id}/ws?token={token}",
                                       websocket=True)
        try:
            buffer = bytearray(rest)
            with anyio.fail_after(3):
                opcode, payload = await read_ws_frame(sock, buffer)
                assert opcode == 0x1 and json.loads(payload)["type"] == "snapshot"
                opcode, _ = await read_ws_frame(sock, buffer)
                assert opcode == 0x9  # ping
                opcode, payload = await read_ws_frame(sock, buffer)
                assert opcode == 0x8 and int.from_bytes(payload[:2], "big") == 1011
        finally:
            sock.close()
        await eventually(lambda: gateway_of(server).connections == 0, 3, "the stream to end")


# -- hubs --------------------------------------------------------------------------------------


async def test_one_hub_and_one_subscription_per_workspace(server: LiveServer,
                                                          http: httpx.AsyncClient,
                                                          tenant: Tenant) -> None:
    other = await create_tenant(http, server.admin_token, name="Globex", teammates=1, teams=1)
    gateway = gateway_of(server)
    bus = server.service.bus
    assert isinstance(bus, MemoryBus)
    before = bus.subscriber_count()
    p0, p1, p2 = tenant.people
    async with StreamClient(server, "ws", tenant.id, p0.token) as a, \
            StreamClient(server, "sse", tenant.id, p1.token) as b, \
            StreamClient(server, "ws", tenant.id, p2.token) as c, \
            StreamClient(server, "sse", other.id, other.people[0].token) as d:
        for client in (a, b, c, d):
            await client.wait_for(lambda m: m.seq >= 0)
        assert gateway.connections == 4
        assert gateway.hubs == 2
        assert bus.subscriber_count() == before + 2
        hub = gateway.hub(tenant.id)
        assert hub is not None and len(hub.streams) == 3
    await eventually(lambda: gateway.connections == 0 and gateway.hubs == 0
                     and bus.subscriber_count() == before,
                     3, "streams, hubs and their subscriptions to end")


async def test_a_hub_that_falls_behind_the_bus_resyncs_its_streams(
        server: LiveServer, http: httpx.AsyncClient, tenant: Tenant,
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hub_module, "SUBSCRIPTION_SIZE", 4)
    p0 = tenant.people[0]
    await write(http, tenant, random.Random(5), [], 10)
    await quiet(server)
    async with StreamClient(server, "ws", tenant.id, p0.token) as client:
        await client.wait_for(lambda m: m.seq >= 0)
        ids: list[int] = []
        await write(http, tenant, random.Random(6), ids, 5)
        await quiet(server)
        # more messages than the hub's buffer, published before the hub can read any
        state = await server.service.state.snapshot(tenant.id)
        for _ in range(10):  # (repeats of a seq the hub has: ignored, but they fill it)
            await server.service.bus.publish(BusMessage(tenant.id, state.epoch, state.seq,
                                                        "delta", {}))
        await client.wait_for(lambda m: len(m.of("snapshot")) == 2, what="a fresh snapshot")
        await write(http, tenant, random.Random(8), ids, 5)
        await quiet(server)
        await assert_converged(http, [client])


async def test_model_checks_can_fail() -> None:
    """The client model catches what the differential test relies on it to catch."""
    model = Model()
    model.apply({"type": "snapshot", "epoch": "e1", "seq": 5,
                 "counts": {"1": 2, "2": {"a": 1}}})
    model.apply({"type": "delta", "epoch": "e1", "seq": 6, "counts": {"2": {"a": 0, "b": 3}}})
    assert model.counts == {"1": 2, "2": {"b": 3}} and model.errors == []
    model.apply({"type": "delta", "epoch": "e1", "seq": 4, "counts": {}})
    model.apply({"type": "delta", "epoch": "e1", "seq": 7, "counts": {}, "extra": 1})
    model.apply({"type": "delta", "epoch": "e2", "seq": 8, "counts": {}})
    model.apply({"type": "delta", "seq": 9, "counts": {}})
    assert len(model.errors) == 5
    model.apply({"type": "views", "views": [{"id": 2}]})
    assert model.counts == {"2": {"b": 3}}
