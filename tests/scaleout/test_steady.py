"""No faults: 3 gateways, 2 counter workers, clients spread over the gateways, writers on
every gateway at once; once the writers stop, every client, every gateway's ``GET /counts``
and SQL agree, for every teammate."""

from __future__ import annotations

import pytest

from .support import (
    GATEWAYS,
    Cluster,
    Truth,
    Writer,
    converge,
    make_tenant,
    spread_clients,
    streaming,
    writing,
)

pytestmark = [pytest.mark.anyio, pytest.mark.postgres, pytest.mark.redis]


async def test_clients_spread_over_gateways_equal_sql_after_concurrent_writers(
        cluster: Cluster) -> None:
    tenant = await make_tenant(cluster, "steady")
    clients = spread_clients(cluster, tenant, 45)
    ids: list[int] = []
    writers = [Writer(cluster, tenant, i % GATEWAYS, seed=i, ids=ids) for i in range(4)]
    async with Truth(cluster.store_url) as truth, streaming(clients):
        async with writing(writers, ops=50):
            pass
        await converge(cluster, tenant, clients, truth)

    assert sum(w.done for w in writers) == 200
    assert {w.start for w in writers} == set(range(GATEWAYS))
    assert not any(w.retried for w in writers), [w.statuses for w in writers]
    for client in clients:
        # one connection each (nothing failed), a snapshot and then deltas
        assert len(client.connections) == 1, (client, client.connections)
        first = client.connections[0].first
        assert first is not None and first["type"] == "snapshot"
        assert client.model.of("delta"), client
    assert {c.kind for c in clients} == {"ws", "sse"}
    assert {c.gateway for c in clients} == set(range(GATEWAYS))
