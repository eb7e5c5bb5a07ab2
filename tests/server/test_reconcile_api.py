"""Live reconciliation and read-your-writes over HTTP: ``POST /api/workspaces/{ws}/reconcile``
recounts the LIVE state (time-dependent views included), repairs drift and publishes it to
the streams; ``--reconcile-every`` does it on its own; every write names its outbox position
and ``GET /counts?after=P`` reflects it."""

from __future__ import annotations

import random
from pathlib import Path

import anyio
import httpx
import pytest

from tests.server.stream_support import (
    StreamClient,
    api_counts,
    eventually,
    stream_server,
    stream_settings,
)
from tests.server.support import auth, create_tenant
from tests.server.test_stream import quiet

pytestmark = pytest.mark.anyio


async def test_reconcile_repairs_the_live_state_and_tells_the_streams(tmp_path: Path) -> None:
    async with stream_server(stream_settings(tmp_path, reconcile_every=None)) as server, \
            server.client() as http:
        tenant = await create_tenant(http, server.admin_token)
        person = tenant.people[0]
        timed = await http.post(tenant.url("/views"), headers=server.admin, json={
            "name": "waiting", "filter": {"field": "waiting_since", "operator": "newer_than",
                                          "value": 3600}})
        assert timed.status_code == 201, timed.text
        rng = random.Random(4)
        for _ in range(12):
            response = await http.post(tenant.url("/conversations"), headers=person.headers,
                                       json={"assignee_id": rng.choice([None, person.id]),
                                             "waiting_since": "2099-01-01T00:00:00Z"})
            assert response.status_code == 201
        await quiet(server)
        clean = await http.post(tenant.url("/reconcile"), headers=server.admin)
        assert clean.status_code == 200, clean.text
        assert clean.json()["drift"] == [] and clean.json()["repaired"] is False
        assert clean.json()["views_checked"] == 8  # the 7 folders and the timed view
        truth = await api_counts(http, tenant.id, person.token)

        async with StreamClient(server, "ws", tenant.id, person.token,
                                teammate=person.id) as client:
            await client.wait_for(lambda m: m.seq >= 0, what="the snapshot")
            state = server.service.state
            views = {v.name: v.id for v in server.service.relay.views(tenant.id)}
            wrong = {(views["All"], None, None): 99, (timed.json()["id"], None, None): 0,
                     (views["Your inbox"], None, person.id): 40}
            current = (await state.snapshot(tenant.id)).counts
            await state.assign(tenant.id, wrong)  # drift behind the relay's back
            response = await http.post(tenant.url("/reconcile"), headers=server.admin)
            assert response.status_code == 200, response.text
            body = response.json()
            assert body["repaired"] is True
            assert sorted((d["view"], d["teammate"], d["state"], d["sql"])
                          for d in body["drift"]) == sorted(
                (view, teammate, value, current.get((view, group, teammate), 0))
                for (view, group, teammate), value in wrong.items())
            assert body["position"] == await server.service.store.outbox_position()
            await eventually(lambda: client.counts == truth["counts"], 3,
                             "the repair to reach the stream")
        assert await api_counts(http, tenant.id, person.token) == {
            **truth, "seq": (await state.snapshot(tenant.id)).seq}
        metrics = (await http.get("/metrics")).text
        assert "livecount_drift_repaired_total 3.0" in metrics
        assert "livecount_reconciles_total 2.0" in metrics


async def test_reconcile_is_admin_only(tmp_path: Path) -> None:
    async with stream_server(stream_settings(tmp_path)) as server, server.client() as http:
        tenant = await create_tenant(http, server.admin_token)
        teammate = await http.post(tenant.url("/reconcile"), headers=tenant.people[0].headers)
        assert teammate.status_code == 403
        missing = await http.post("/api/workspaces/999999/reconcile", headers=server.admin)
        assert missing.status_code == 404
        anonymous = await http.post(tenant.url("/reconcile"))
        assert anonymous.status_code == 401


async def test_the_scheduled_reconcile_repairs_on_its_own(tmp_path: Path) -> None:
    async with stream_server(stream_settings(tmp_path, reconcile_every=0.3)) as server, \
            server.client() as http:
        tenant = await create_tenant(http, server.admin_token)
        await http.post(tenant.url("/conversations"), headers=tenant.people[0].headers,
                        json={})
        await quiet(server)
        truth = await api_counts(http, tenant.id, server.admin_token)
        views = {v.name: v.id for v in server.service.relay.views(tenant.id)}
        await server.service.state.assign(tenant.id, {(views["All"], None, None): 7})

        async def repaired() -> bool:
            return (await api_counts(http, tenant.id, server.admin_token))["counts"] == truth[
                "counts"]

        for _ in range(100):
            if await repaired():
                break
            await anyio.sleep(0.05)
        assert await repaired()
        assert server.service.relay.drift_repaired == 1


async def test_writes_name_their_position_and_counts_wait_for_it(tmp_path: Path) -> None:
    async with stream_server(stream_settings(tmp_path, relay_poll_interval=0.05)) as server, \
            server.client() as http:
        tenant = await create_tenant(http, server.admin_token)
        person = tenant.people[0]
        views = await api_counts(http, tenant.id, person.token)
        positions = []
        for i in range(30):
            response = await http.post(tenant.url("/conversations"), headers=person.headers,
                                       json={"assignee_id": person.id})
            positions.append(int(response.headers["Livecount-Position"]))
            counts = (await http.get(tenant.url(f"/counts?after={positions[-1]}"),
                                     headers=person.headers)).json()["counts"]
            # read-your-writes: the count already includes this write, every time
            mine = next(k for k in views["counts"] if counts[k] == i + 1
                        and views["counts"][k] == 0)
            assert mine
        assert positions == sorted(positions) and len(set(positions)) == 30
        patch = await http.patch(tenant.url("/conversations/1"), headers=person.headers,
                                 json={"state": "closed"})
        assert int(patch.headers["Livecount-Position"]) > positions[-1]
        unchanged = await http.patch(tenant.url("/conversations/1"), headers=person.headers,
                                     json={"state": "closed"})
        assert "Livecount-Position" not in unchanged.headers  # nothing was written
        ahead = await http.get(tenant.url("/counts?after=99999999"), headers=person.headers)
        assert ahead.status_code == 400 and ahead.json()["error"]["code"] == "invalid"
        bad = await http.get(tenant.url("/counts?after=x"), headers=person.headers)
        assert bad.status_code == 400


async def test_counts_after_a_position_the_relay_cannot_reach_is_503(tmp_path: Path) -> None:
    async with stream_server(stream_settings(tmp_path)) as server, server.client() as http:
        tenant = await create_tenant(http, server.admin_token)
        await server.service.relay.stop()  # nothing applies the outbox any more
        response = await http.post(tenant.url("/conversations"), json={},
                                   headers=tenant.people[0].headers)
        position = response.headers["Livecount-Position"]
        waited = await http.get(tenant.url(f"/counts?after={position}"),
                                headers=auth(tenant.people[0].token),
                                timeout=httpx.Timeout(20))
        assert waited.status_code == 503
        assert waited.headers["Retry-After"] == "1"
