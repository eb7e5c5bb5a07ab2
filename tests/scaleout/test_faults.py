"""Faults under load, each ending with exact counts (every client, every gateway's
``GET /counts`` and SQL agree for every teammate) and no client stuck:

- a counter worker killed (SIGKILL) while writes flow: the other takes its shards over after
  the lease ttl;
- a gateway killed: its clients reconnect to another gateway and resume (epoch + since);
- the Redis server restarted empty: the workers recount from PostgreSQL, a new epoch, every
  client gets a snapshot of it;
- ``pg_terminate_backend`` on every connection of every process, repeatedly, during writes;
- a lost NOTIFY: a write that notifies nobody is applied within the workers' poll;
- a stale owner (SIGSTOP past the lease ttl, then SIGCONT): the other worker took over and
  re-read the outbox; the stale one learns it lost its leases and writes nothing that
  counts.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time

import httpx
import pytest

from livecount.state.base import StateFenced, StateSnapshot
from livecount.state.redis import RedisState
from tests.server.support import Tenant, auth

from .support import (
    ADMIN,
    GATEWAYS,
    LEASE_TTL,
    SHARDS,
    WORKERS,
    Backend,
    Cluster,
    Managed,
    Truth,
    Writer,
    converge,
    eventually,
    listening,
    make_tenant,
    metric_value,
    metrics,
    notifications,
    silent_store,
    spread_clients,
    streaming,
    writes_made,
    writing,
)

pytestmark = [pytest.mark.anyio, pytest.mark.postgres, pytest.mark.redis]

#: How long a takeover may take: the lease's ttl, the next round of the survivor (ttl / 3,
#: jittered), and slack for a loaded 2-core machine.
TAKEOVER_BOUND = LEASE_TTL + LEASE_TTL / 3 * 1.1 + 2.5


def writers_for(cluster: Cluster, tenant: Tenant, n: int = GATEWAYS) -> list[Writer]:
    ids: list[int] = []
    return [Writer(cluster, tenant, i % GATEWAYS, seed=100 + i, ids=ids) for i in range(n)]


async def more_writes(writers: list[Writer], n: int, within: float = 20.0) -> None:
    """Wait until the (running) writers have made ``n`` more writes: they are not wedged."""
    target = writes_made(writers) + n
    await eventually(lambda: writes_made(writers) >= target, within,
                     f"{n} more writes ({[w.statuses for w in writers]})")


async def shards_owned(worker: Managed) -> float:
    return metric_value(await metrics(worker.base), "livecount_shards_owned")


async def leases_lost(worker: Managed) -> float:
    return metric_value(await metrics(worker.base), "livecount_leases_lost")


def _position(cluster: Cluster, workspace_id: int) -> int:
    with contextlib.suppress(Exception), cluster.redis_client() as client:
        return int(client.hget(f"lcso:{{ws:{workspace_id}}}:state", "_pos") or 0)
    return 0


def other_worker(cluster: Cluster, worker: Managed) -> Managed:
    assert WORKERS == 2
    return next(w for w in cluster.workers if w is not worker)


async def test_a_worker_killed_mid_batch_is_taken_over_and_counts_stay_exact(
        cluster: Cluster) -> None:
    tenant = await make_tenant(cluster, "killworker")
    victim = cluster.owner(tenant.id)
    assert victim is not None
    survivor = other_worker(cluster, victim)
    fence_before = cluster.fence(tenant.id)
    assert fence_before is not None
    clients = spread_clients(cluster, tenant, 15)
    writers = writers_for(cluster, tenant)
    async with Truth(cluster.store_url) as truth, streaming(clients):
        async with writing(writers):
            await more_writes(writers, 30)
            # frozen wherever it is (inside a step, between a state write and its publish,
            # ...), it falls behind the writes, then dies with that backlog
            victim.signal(signal.SIGSTOP)
            await more_writes(writers, 10)
            victim.kill()
            killed = time.monotonic()
            behind, last = _position(cluster, tenant.id), max(w.last_position for w in writers)
            assert 0 < behind < last
            await more_writes(writers, 10)  # committed while nobody counts the workspace
            await eventually(lambda: _holds_all(survivor), TAKEOVER_BOUND + 5,
                             f"{survivor.name} to take every shard over")
            took = time.monotonic() - killed
            await more_writes(writers, 30)
        await converge(cluster, tenant, clients, truth)

    assert took <= TAKEOVER_BOUND, f"the takeover took {took:.1f} s"
    assert cluster.owner(tenant.id) is survivor
    fence_after = cluster.fence(tenant.id)
    assert fence_after is not None and fence_after > fence_before
    log = cluster.log_since_mark(survivor)
    assert f"(holds {SHARDS} of {SHARDS})" in log, log[-3000:]
    # the clients never noticed: a worker is not something they talk to
    for client in clients:
        assert len(client.connections) == 1, (client, client.connections)


async def _holds_all(worker: Managed) -> bool:
    return await shards_owned(worker) == SHARDS


async def test_a_killed_gateways_clients_resume_on_another_and_end_exact(
        cluster: Cluster) -> None:
    tenant = await make_tenant(cluster, "killgateway")
    victim_index = 1
    victim = cluster.gateways[victim_index]
    clients = spread_clients(cluster, tenant, 18)
    moved = [c for c in clients if c.gateway == victim_index]
    stayed = [c for c in clients if c.gateway != victim_index]
    assert moved and stayed
    writers = writers_for(cluster, tenant)
    async with Truth(cluster.store_url) as truth, streaming(clients):
        async with writing(writers):
            await more_writes(writers, 30)
            epoch = cluster.epoch(tenant.id)
            positions = {c.name: (c.model.epoch, c.model.seq) for c in moved}
            victim.kill()
            await eventually(lambda: all(c.open and c.gateway != victim_index for c in moved),
                             15, "the victim's clients to reconnect elsewhere")
            await more_writes(writers, 30)
        await converge(cluster, tenant, clients, truth)

    assert cluster.epoch(tenant.id) == epoch  # a gateway holds no counter state
    resumed = []
    for client in moved:
        assert len(client.connections) >= 2, (client, client.connections)
        # the first connection after the kill named where the client was ...
        after = client.connections[1]
        assert after.gateway != victim_index
        assert after.resumed_from is not None
        assert after.resumed_from[0] == epoch
        assert after.resumed_from[1] >= positions[client.name][1]
        # ... and was answered with one merged delta or a snapshot, of the same epoch
        assert after.first is not None and after.first["type"] in ("delta", "snapshot"), after
        assert after.first["epoch"] == epoch
        resumed.append(after.first["type"])
    # the bus still held their seqs: at least some resumed with a delta, not a snapshot
    assert "delta" in resumed, resumed
    for client in stayed:
        assert len(client.connections) == 1, (client, client.connections)
    # the writers through the victim moved on too
    assert any(w.failovers for w in writers if w.start == victim_index)


async def test_a_restarted_redis_is_rebuilt_from_postgres_in_a_new_epoch(
        cluster: Cluster) -> None:
    tenant = await make_tenant(cluster, "redisrestart")
    old_epoch = cluster.epoch(tenant.id)
    old_fence = cluster.fence(tenant.id)
    assert old_epoch and old_fence
    clients = spread_clients(cluster, tenant, 15)
    writers = writers_for(cluster, tenant)
    async with Truth(cluster.store_url) as truth, streaming(clients):
        async with writing(writers):
            await more_writes(writers, 20)
            await cluster.restart_redis()
            # writes go on while the counts are rebuilt (the store does not need Redis)
            await more_writes(writers, 20)
            new_epoch = await eventually(lambda: _new_epoch(cluster, tenant.id, old_epoch),
                                         20, "the workspace's state in a new epoch")
            # a worker recounted it from the store, at an outbox position past every write
            # made so far (those during the outage included)
            last = max(w.last_position for w in writers)
            await eventually(lambda: _position(cluster, tenant.id) >= last, 20,
                             f"the state to be rebuilt up to position {last}")
            assert cluster.epoch(tenant.id) == new_epoch
            # and counts on from there, with deltas
            await more_writes(writers, 30)
        await converge(cluster, tenant, clients, truth, within=30)
        # the rebuilt state reflects every write: each gateway answers ?after= the last one
        last = max(w.last_position for w in writers)
        async with contextlib.AsyncExitStack() as stack:
            for gateway in cluster.gateways:
                http = await stack.enter_async_context(httpx.AsyncClient(
                    base_url=gateway.base, timeout=10, trust_env=False))
                response = await http.get(tenant.url("/counts"), params={"after": last},
                                          headers=auth(ADMIN))
                assert response.status_code == 200, response.text

    assert cluster.epoch(tenant.id) == new_epoch
    for client in clients:
        assert client.model.epoch == new_epoch, client
        # the client got a snapshot of the new epoch (never a delta across epochs: Model
        # records that as an error, which converge() checked)
        assert any(m["epoch"] == new_epoch for m in client.model.of("snapshot")), client
    # the leases went with the data: the workspace is counted under a lease taken since,
    # whose fence is still higher than the lost one's (else the old owner could fence the
    # new one out)
    # (read once a lease is there: on a loaded machine a renewal can lapse and the shard be
    # taken again, leaving a moment with no lease)
    new_fence = await eventually(lambda: cluster.fence(tenant.id), 10, "a lease on the shard")
    assert new_fence > old_fence
    logs = "".join(cluster.log_since_mark(w) for w in cluster.workers)
    assert "took" in logs, logs[-4000:]


def _new_epoch(cluster: Cluster, workspace_id: int, old: str) -> str | None:
    with contextlib.suppress(Exception):
        epoch = cluster.epoch(workspace_id)
        if epoch and epoch != old:
            return epoch
    return None


async def test_terminated_database_connections_cost_retries_never_a_wedge(
        cluster: Cluster) -> None:
    tenant = await make_tenant(cluster, "terminate")
    clients = spread_clients(cluster, tenant, 15)
    writers = writers_for(cluster, tenant)
    terminated: list[Backend] = []
    async with Truth(cluster.store_url) as truth, streaming(clients):
        async with writing(writers):
            await more_writes(writers, 20)
            for _ in range(3):
                terminated += cluster.terminate_backends()
                await asyncio.sleep(0.3)
            # never wedged: writes go on through every gateway, and so does the counting
            await more_writes(writers, 40)
        await converge(cluster, tenant, clients, truth)

    # every process lost connections: each gateway's pool (they all served writes), each
    # worker's pool and its LISTEN connection
    hit = {b.process for b in terminated}
    assert hit >= {m.name for m in [*cluster.gateways, *cluster.workers]}, terminated
    listeners = {b.process for b in terminated if b.query.startswith("LISTEN")}
    assert listeners == {w.name for w in cluster.workers}, terminated
    assert all(m.alive for m in cluster.processes)
    for client in clients:
        assert len(client.connections) == 1, (client, client.connections)


async def test_a_write_whose_notify_is_lost_is_applied_by_the_poll(cluster: Cluster) -> None:
    tenant = await make_tenant(cluster, "lostnotify")
    clients = spread_clients(cluster, tenant, 6)
    person = tenant.people[1]
    delays = []
    async with Truth(cluster.store_url) as truth, streaming(clients), \
            silent_store(cluster.store_url) as silent, \
            httpx.AsyncClient(base_url=cluster.gateways[2].base, timeout=10,
                              trust_env=False) as http:
        async with writing(writers_for(cluster, tenant), ops=10):
            pass  # some conversations first, so the counts compared mean something
        await converge(cluster, tenant, clients, truth)
        with listening(cluster.store_url) as listener:
            # control: a write through a gateway notifies (and this connection hears it)
            response = await http.post(tenant.url("/conversations"), json={},
                                       headers=person.headers)
            assert response.status_code == 201, response.text
            assert await notifications(listener, 2.0, first=True)
            for i, someone in enumerate(tenant.people[:3]):
                await asyncio.sleep(0.1 * i)  # not in step with the poll
                started = time.monotonic()
                await silent.create_conversation(
                    tenant.id, {"assignee_id": someone.id, "tags": [f"lost{i}"]}, someone.id)
                position = await silent.outbox_position()
                # waits (up to 5 s in the gateway) until the counts reflect it
                response = await http.get(tenant.url("/counts"), params={"after": position},
                                          headers=person.headers)
                assert response.status_code == 200, response.text
                delays.append(time.monotonic() - started)
            # nobody was told (and nothing else wrote meanwhile): the workers found those
            # writes by polling the outbox
            assert await notifications(listener, 0.2) == []
        await converge(cluster, tenant, clients, truth)
    # the workers poll the outbox every second on PostgreSQL
    assert max(delays) <= 3.0, delays


async def test_a_stale_owner_is_fenced_and_the_takeover_rereads_the_outbox(
        cluster: Cluster) -> None:
    tenant = await make_tenant(cluster, "stale")
    stale = cluster.owner(tenant.id)
    assert stale is not None
    other = other_worker(cluster, stale)
    lost_before = await leases_lost(stale)
    fence_before = cluster.fence(tenant.id)
    assert fence_before is not None
    clients = spread_clients(cluster, tenant, 12)
    writers = writers_for(cluster, tenant)
    async with Truth(cluster.store_url) as truth, streaming(clients):
        try:
            async with writing(writers):
                await more_writes(writers, 20)
                stale.signal(signal.SIGSTOP)  # a pause: mid-step, holding its leases
                await eventually(lambda: _holds_all(other), TAKEOVER_BOUND + 5,
                                 f"{other.name} to take the stale worker's shards")
                # the new owner recounted the workspace from a snapshot and reads on from
                # its own cursor: outbox entries the snapshot already holds come again
                await more_writes(writers, 20)
                assert cluster.owner(tenant.id) is other
                fence_new = cluster.fence(tenant.id)
                assert fence_new is not None and fence_new > fence_before
                stale.signal(signal.SIGCONT)  # it wakes up believing it owns its shards
                await eventually(lambda: _lost_more(stale, lost_before), 10,
                                 f"{stale.name} to find it lost its leases")
                await more_writes(writers, 20)
        finally:
            if stale.stopped:
                stale.signal(signal.SIGCONT)
        await converge(cluster, tenant, clients, truth)
        # The same two things, done by hand on the live state: a late write carrying the
        # stale owner's fence is refused, and a batch replayed up to the position already
        # applied (a duplicated outbox read, with the current owner's fence) changes nothing.
        # (Once the shards are split again and the workspace's state is still: the relays
        # write it no more.)
        await eventually(lambda: not cluster.ready_problems(), 20, "the shards split again")
        state = RedisState(cluster.broker)
        try:
            before = await eventually(lambda: _still(state, tenant.id), 10,
                                      "the workspace's state to be still")
            key = (next(v.id for v in before.views if v.name == "All"), None, None)
            with cluster.redis_client() as r:
                highest = int(r.hget(f"lcso:{{ws:{tenant.id}}}:state", "_fence") or 0)
            assert highest > fence_before
            with pytest.raises(StateFenced):
                await state.apply(tenant.id, {key: 1000}, before.position + 1,
                                  before.position, fence=fence_before)
            replay = await state.apply(tenant.id, {key: 1000}, before.position,
                                       before.position - 1, fence=highest)
            assert replay.duplicate
            after = await state.snapshot(tenant.id)
            assert (after.epoch, after.seq, after.position, after.counts) == (
                before.epoch, before.seq, before.position, before.counts)
        finally:
            await state.close()
        await converge(cluster, tenant, clients, truth)

    # every write to the state since the takeover carried a fence at least the new owner's
    with cluster.redis_client() as r:
        fence_seen = int(r.hget(f"lcso:{{ws:{tenant.id}}}:state", "_fence") or 0)
    assert fence_seen >= fence_new
    # the stale worker learnt it had lost its leases (at its next renewal, or when a late
    # write of its relay was fenced)
    log = cluster.log_since_mark(stale)
    assert "was not ours any more" in log or "was taken over" in log or "lapsed" in log, log
    for client in clients:
        assert len(client.connections) == 1, (client, client.connections)


async def _still(state: RedisState, workspace_id: int) -> StateSnapshot | None:
    """The workspace's state snapshot, if it did not change over 0.3 s."""
    first = await state.snapshot(workspace_id)
    await asyncio.sleep(0.3)
    second = await state.snapshot(workspace_id)
    return second if (first.epoch, first.seq, first.position) == (
        second.epoch, second.seq, second.position) else None


async def _lost_more(worker: Managed, before: float) -> bool:
    return await leases_lost(worker) > before

