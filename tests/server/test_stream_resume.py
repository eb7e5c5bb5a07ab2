"""Resuming a stream: ``?epoch=E&since=S`` (both transports) or ``Last-Event-ID: E:S`` (SSE).

When the bus still holds ``S`` the first message is ONE delta with the current seq and the
current value of every counter changed after ``S`` (and only those the caller sees); applied
to what the client held at ``S`` it gives ``GET /counts``. Otherwise — ``S`` evicted from
the bus, ``S`` ahead of the server, or the views changed meanwhile — the view list and a
snapshot.
"""

from __future__ import annotations

import copy
import random
from pathlib import Path
from typing import Any

import httpx
import pytest

from livecount.bus import MemoryBus
from livecount.views import render_keys
from tests.server.stream_support import (
    Model,
    StreamClient,
    api_counts,
    eventually,
    gateway_of,
    stream_server,
    stream_settings,
)
from tests.server.support import LiveServer, Person, Tenant, auth, create_tenant
from tests.server.test_stream import MINE, OPEN_MENTIONS, create_view, quiet, write

pytestmark = pytest.mark.anyio


@pytest.fixture
async def tenant(server: LiveServer, http: httpx.AsyncClient) -> Tenant:
    tenant = await create_tenant(http, server.admin_token)
    owner = tenant.people[0]
    await create_view(http, tenant, owner.token, "Mine", OPEN_MENTIONS, "tags", personal=True)
    await write(http, tenant, random.Random(11), [], 12)
    await quiet(server)
    return tenant


def resume(server: LiveServer, kind: str, tenant: Tenant, person: Person, since: int,
           how: str = "query", epoch: str | None = None) -> StreamClient:
    epoch = epoch or epoch_of(server)
    if how == "last-event-id":
        return StreamClient(server, kind, tenant.id, person.token, teammate=person.id,
                            headers={"Last-Event-ID": f"{epoch}:{since}"})
    return StreamClient(server, kind, tenant.id, person.token, teammate=person.id,
                        query=f"epoch={epoch}&since={since}")


def epoch_of(server: LiveServer) -> str:
    epoch: str = server.service.state.epoch  # type: ignore[attr-defined]
    return epoch


async def held_at_disconnect(server: LiveServer, kind: str, tenant: Tenant,
                             person: Person) -> Model:
    async with StreamClient(server, kind, tenant.id, person.token, teammate=person.id) as c:
        await c.wait_for(lambda m: m.seq >= 0, what="the snapshot")
        await quiet(server)
        return copy.deepcopy(c.model)


async def changes(http: httpx.AsyncClient, tenant: Tenant, person: Person) -> None:
    """Writes that change base counters and ``person``'s own adjustments."""
    other = tenant.people[1]
    for body in ({"assignee_id": person.id, "tags": ["vip"]},
                 {"mentions": [person.id], "tags": ["bug"]},
                 {"assignee_id": other.id, "team_id": tenant.teams[0]["id"]}):
        response = await http.post(tenant.url("/conversations"), json=body,
                                    headers=other.headers)
        assert response.status_code == 201, response.text


@pytest.mark.parametrize(("kind", "how"), [("ws", "query"), ("sse", "query"),
                                           ("sse", "last-event-id")])
async def test_resume_sends_one_merged_delta(server: LiveServer, http: httpx.AsyncClient,
                                            tenant: Tenant, kind: str, how: str) -> None:
    person = tenant.people[0]
    held = await held_at_disconnect(server, kind, tenant, person)
    since = held.seq
    await changes(http, tenant, person)
    await quiet(server)
    expected = await api_counts(http, tenant.id, person.token)
    assert expected["seq"] > since + 1  # several bus messages to merge
    messages = await server.service.bus.since(tenant.id, held.epoch, since)
    assert messages is not None
    changed = {(vid, group) for m in messages for vid, group, who in m.counts
               if who in (None, person.id)}
    views = {v.id: v for v in server.service.relay.views(tenant.id)}
    state = await server.service.state.snapshot(tenant.id)
    wanted = render_keys(views, state.counts, person.id, changed)
    # another teammate's adjustments changed too, and must not be sent
    assert any(who not in (None, person.id) for m in messages for _, _, who in m.counts)

    async with resume(server, kind, tenant, person, since, how) as client:
        await client.wait_for(lambda m: bool(m.messages), what="the resume delta")
        await quiet(server)
        assert client.model.messages == [
            {"type": "delta", "epoch": held.epoch, "seq": expected["seq"], "counts": wanted}]
        held.apply(client.model.messages[0])
        assert held.counts == expected["counts"]
        assert held.errors == []
        if kind == "sse":
            assert client.model.sse_ids == [f"{held.epoch}:{expected['seq']}"]


@pytest.mark.parametrize("kind", ["ws", "sse"])
async def test_resume_at_the_current_seq_is_an_empty_delta(server: LiveServer,
                                                          http: httpx.AsyncClient,
                                                          tenant: Tenant, kind: str) -> None:
    person = tenant.people[1]
    held = await held_at_disconnect(server, kind, tenant, person)
    async with resume(server, kind, tenant, person, held.seq) as client:
        await client.wait_for(lambda m: bool(m.messages))
        await quiet(server)
        assert client.model.messages == [{"type": "delta", "epoch": held.epoch,
                                          "seq": held.seq, "counts": {}}]
        # and it goes on with deltas, from what the client held
        await changes(http, tenant, person)
        await quiet(server)
        expected = await api_counts(http, tenant.id, person.token)
        await eventually(lambda: replay(held, client.model.messages) == expected["counts"], 5,
                         "the resumed client to follow")


def replay(held: Model, messages: list[dict[str, Any]]) -> dict[str, Any]:
    model = copy.deepcopy(held)
    for message in messages:
        model.apply(message)
    assert model.errors == []
    return model.counts


async def expect_snapshot(client: StreamClient, http: httpx.AsyncClient, tenant: Tenant,
                          person: Person) -> None:
    await client.wait_for(lambda m: bool(m.of("snapshot")), what="a snapshot")
    kinds = [m["type"] for m in client.model.messages]
    assert kinds[:2] == ["views", "snapshot"], kinds
    expected = await api_counts(http, tenant.id, person.token)
    assert client.model.messages[1] == {"type": "snapshot", "epoch": epoch_of(client.server),
                                        "seq": expected["seq"], "counts": expected["counts"]}
    listed = {str(v["id"]) for v in client.model.messages[0]["views"]}
    assert listed == set(expected["counts"])


@pytest.mark.parametrize("kind", ["ws", "sse"])
async def test_resume_from_the_future_is_a_snapshot(server: LiveServer,
                                                   http: httpx.AsyncClient, tenant: Tenant,
                                                   kind: str) -> None:
    person = tenant.people[0]
    seq = (await api_counts(http, tenant.id, person.token))["seq"]
    async with resume(server, kind, tenant, person, seq + 50) as client:
        await expect_snapshot(client, http, tenant, person)


@pytest.mark.parametrize("kind", ["ws", "sse"])
async def test_resume_across_a_views_change_is_a_snapshot(server: LiveServer,
                                                         http: httpx.AsyncClient,
                                                         tenant: Tenant, kind: str) -> None:
    person = tenant.people[2]
    held = await held_at_disconnect(server, kind, tenant, person)
    await create_view(http, tenant, person.token, "Mine", MINE, personal=True)
    await changes(http, tenant, person)
    await quiet(server)
    async with resume(server, kind, tenant, person, held.seq, "last-event-id"
                      if kind == "sse" else "query") as client:
        await expect_snapshot(client, http, tenant, person)


@pytest.mark.parametrize("kind", ["ws", "sse"])
async def test_resume_from_a_seq_the_bus_dropped_is_a_snapshot(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kind: str) -> None:
    monkeypatch.setattr("livecount.service.open_bus", lambda url: MemoryBus(ring_size=4))
    async with stream_server(stream_settings(tmp_path)) as server, server.client() as http:
        tenant = await create_tenant(http, server.admin_token)
        person = tenant.people[0]
        held = await held_at_disconnect(server, kind, tenant, person)
        for i in range(6):  # more bus messages than the ring keeps
            response = await http.post(tenant.url("/conversations"), headers=person.headers,
                                       json={"assignee_id": person.id, "tags": [f"t{i}"]})
            assert response.status_code == 201
            await server.service.relay.sync()
        assert await server.service.bus.since(tenant.id, held.epoch, held.seq) is None
        async with resume(server, kind, tenant, person, held.seq) as client:
            await expect_snapshot(client, http, tenant, person)
        await eventually(lambda: gateway_of(server).connections == 0, 3, "streams to end")


async def test_a_query_since_wins_over_last_event_id(server: LiveServer,
                                                    http: httpx.AsyncClient,
                                                    tenant: Tenant) -> None:
    person = tenant.people[0]
    seq = (await api_counts(http, tenant.id, person.token))["seq"]
    epoch = epoch_of(server)
    client = StreamClient(server, "sse", tenant.id, person.token,
                          query=f"epoch={epoch}&since={seq}",
                          headers={"Last-Event-ID": f"{epoch}:{seq + 100}",
                                   **auth(person.token)})
    async with client:
        await client.wait_for(lambda m: bool(m.messages))
        assert client.model.messages[0] == {"type": "delta", "epoch": epoch, "seq": seq,
                                            "counts": {}}


@pytest.mark.parametrize(("kind", "how"), [("ws", "query"), ("sse", "last-event-id"),
                                           ("ws", "no-epoch")])
async def test_resume_from_another_epoch_is_a_snapshot(server: LiveServer,
                                                      http: httpx.AsyncClient, tenant: Tenant,
                                                      kind: str, how: str) -> None:
    """Seqs of another incarnation (a restart, a failover) are never merged into a delta,
    even when the number exists here: the client gets the view list and a snapshot."""
    person = tenant.people[0]
    seq = (await api_counts(http, tenant.id, person.token))["seq"]
    if how == "no-epoch":
        client = StreamClient(server, kind, tenant.id, person.token, teammate=person.id,
                              query=f"since={seq - 1}")
    else:
        client = resume(server, kind, tenant, person, seq - 1, how, epoch="0ther3poch")
    async with client:
        await expect_snapshot(client, http, tenant, person)
