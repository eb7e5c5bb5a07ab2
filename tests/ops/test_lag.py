"""Stream lag and outbox lag in /metrics: the delivery histogram (a hub receiving a change from
the bus → the client send that carried it) and the age of the oldest unapplied outbox
entry."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from livecount.server.metrics import LagHistogram
from tests.server.stream_support import StreamClient, stream_server, stream_settings
from tests.server.support import create_tenant

from .support import samples

pytestmark = pytest.mark.anyio

DELIVERY = "livecount_stream_delivery_seconds"

async def test_delivery_histogram_counts_each_client_send(tmp_path: Path) -> None:
    async with stream_server(stream_settings(tmp_path)) as server, server.client() as http:
        tenant = await create_tenant(http, server.admin_token)
        ann, bob, _ = tenant.people
        before = samples((await http.get("/metrics")).text)
        assert before[(f"{DELIVERY}_count", ())] == 0
        async with StreamClient(server, "ws", tenant.id, ann.token) as ws, \
                StreamClient(server, "sse", tenant.id, bob.token) as sse:
            for client in (ws, sse):
                await client.wait_for(lambda m: m.seq >= 0)
            for _ in range(3):
                response = await http.post(tenant.url("/conversations"), json={},
                                           headers=ann.headers)
                assert response.status_code == 201
                seq = (await http.get(tenant.url("/counts"), headers=ann.headers)).json()["seq"]
                for client in (ws, sse):
                    await client.wait_for(lambda m, s=seq: m.seq >= s, what="the delta")
            text = (await http.get("/metrics")).text
        found = samples(text)
        count = found[(f"{DELIVERY}_count", ())]
        # one observation per client send of a change: at least one per client, at most one
        # per write per client (changes that arrive together go out in one send)
        assert 2 <= count <= 6
        assert found[(f"{DELIVERY}_bucket", (("le", "+Inf"),))] == count
        assert 0 < found[(f"{DELIVERY}_sum", ())] < count * 1.0  # well under a second each
        assert found[(f"{DELIVERY}_bucket", (("le", "1.0"),))] == count
        assert "# TYPE livecount_stream_delivery_seconds histogram" in text

async def test_outbox_lag_in_seconds(tmp_path: Path) -> None:
    async with stream_server(stream_settings(tmp_path)) as server, server.client() as http:
        tenant = await create_tenant(http, server.admin_token)
        await server.service.relay.sync()
        idle = samples((await http.get("/metrics")).text)
        assert idle[("livecount_outbox_lag_seconds", ())] == 0
        assert idle[("livecount_outbox_lag_entries", ())] == 0

        await server.service.relay.stop()  # nothing applies the outbox any more
        for _ in range(2):
            response = await http.post(tenant.url("/conversations"), json={},
                                       headers=tenant.people[0].headers)
            assert response.status_code == 201
        await asyncio.sleep(0.6)
        behind = samples((await http.get("/metrics")).text)
        assert behind[("livecount_outbox_lag_entries", ())] == 2
        lag = behind[("livecount_outbox_lag_seconds", ())]
        assert 0.5 <= lag < 30  # the age of the OLDEST unapplied entry


def test_lag_histogram_buckets() -> None:
    histogram = LagHistogram((0.01, 0.1, 1.0))
    for value in (0.001, 0.01, 0.05, 0.5, 3.0):
        histogram.observe(value)
    family = histogram.family("x_seconds", "help")
    buckets = {s.labels["le"]: s.value for s in family.samples if s.name == "x_seconds_bucket"}
    assert buckets == {"0.01": 2, "0.1": 3, "1.0": 4, "+Inf": 5}
    sums = {s.name: s.value for s in family.samples if not s.name.endswith("_bucket")}
    assert sums["x_seconds_count"] == 5
    assert sums["x_seconds_sum"] == pytest.approx(3.561)


async def test_delivery_counts_from_the_commit(tmp_path: Path) -> None:
    """A change the relay applies late is delivered late: the histogram starts at the
    outbox commit (carried by the bus message), not when the gateway hears of it."""
    async with stream_server(stream_settings(tmp_path)) as server, server.client() as http:
        tenant = await create_tenant(http, server.admin_token)
        ann = tenant.people[0]
        async with StreamClient(server, "ws", tenant.id, ann.token) as ws:
            await ws.wait_for(lambda m: m.seq >= 0)
            before = samples((await http.get("/metrics")).text)
            seq_before = ws.model.seq
            async with server.service.relay.lock:  # the relay stalls for 0.5 s
                response = await http.post(tenant.url("/conversations"), json={},
                                           headers=ann.headers)
                assert response.status_code == 201
                await asyncio.sleep(0.5)
            await ws.wait_for(lambda m: m.seq > seq_before, what="the delta")
            await asyncio.sleep(0.1)
            after = samples((await http.get("/metrics")).text)
        count = after[(f"{DELIVERY}_count", ())] - before[(f"{DELIVERY}_count", ())]
        total = after[(f"{DELIVERY}_sum", ())] - before[(f"{DELIVERY}_sum", ())]
        assert count >= 1
        assert total / count >= 0.45
