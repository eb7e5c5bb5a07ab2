"""The relay on SQLite + the Redis counter state + the Redis Streams bus: exact over writes and
view changes, through lost Redis data (a new epoch, a recount) and lost replies of the
state's ``apply`` (the batch landed, the relay never heard: sent again, a duplicate); and the
real server on a Redis broker, whose stream clients converge through all of it.

The property with faults at the Redis state's calls runs on SQLite and on PostgreSQL (the
production store of a Redis broker, tests/backends.py); the examples stay on SQLite, the
cheap store (tests/test_faults.py and tests/test_relay.py run theirs on PostgreSQL + Redis
too)."""

from __future__ import annotations

import contextlib
import random
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from livecount.bus.redis import RedisBus
from livecount.relay import Relay
from livecount.service import Service, Settings
from livecount.state import StateConflict
from livecount.state.redis import RedisState
from livecount.store import open_store
from livecount.store.base import Store
from tests.backends import POSTGRES_REDIS
from tests.faults import KINDS, Faults
from tests.server.stream_support import StreamClient, stream_server, stream_settings
from tests.server.support import create_tenant
from tests.server.test_stream import VIP, assert_converged, create_view, quiet, write
from tests.state.redis_support import delete_prefix, lose_data, prefix_of, scratch_url
from tests.strategies import NOW
from tests.test_faults import (
    FAILURES,
    Follower,
    apply_op,
    assert_exact,
    make_world,
    operations,
    relay_of,
    settle,
)
from tests.test_relay import exact, tenant

pytestmark = [pytest.mark.anyio, pytest.mark.redis]


@pytest.fixture
def broker(request: pytest.FixtureRequest) -> Any:
    url = scratch_url(request.config)
    yield url
    delete_prefix(prefix_of(url))


@pytest.fixture
async def store(sqlite_url: str) -> AsyncIterator[Store]:
    store = open_store(sqlite_url)
    await store.open()
    try:
        yield store
    finally:
        await store.close()


async def sync(relay: Relay) -> int:
    """``relay.sync()``, through the conflicts lost Redis data causes (each makes the relay
    recount the workspace at its next step); how many there were."""
    for conflicts in range(5):
        try:
            await relay.sync()
            return conflicts
        except StateConflict:
            continue
    pytest.fail("the relay kept conflicting")


async def test_the_relay_stays_exact_through_writes_views_and_lost_redis_data(
        store: Store, broker: str) -> None:
    ws, people, teams = await tenant(store)
    state, bus = RedisState(broker), RedisBus(broker)
    relay = Relay(store, state, bus, clock=lambda: NOW)
    try:
        await relay.start(background=False)
        follower = Follower(bus, state, ws)
        await follower.reload()
        rng = random.Random(11)
        ids: list[int] = []

        async def writes(n: int) -> None:
            for _ in range(n):
                if ids and rng.random() < 0.6:
                    await store.update_conversation(ws, rng.choice(ids), {
                        "state": rng.choice(["open", "closed"]),
                        "assignee_id": rng.choice([None, *people]),
                        "tags": rng.sample(["vip", "bug", "billing"], rng.randint(0, 2))}, None)
                else:
                    ids.append((await store.create_conversation(ws, {
                        "team_id": rng.choice([None, *teams]),
                        "tags": ["vip"] * rng.randint(0, 1)}, people[0])).id)

        await writes(60)
        vip = await store.create_view(ws, "VIP", {"field": "tags", "operator": "contains",
                                                  "value": "vip"}, "assignee_id", None)
        await writes(30)
        assert await sync(relay) == 0
        await exact(relay, store, ws)
        before = await state.snapshot(ws)
        assert any(k[0] == vip.id for k in before.counts)

        assert lose_data(broker) > 0  # FLUSHDB, or Redis restarted without persistence
        await writes(20)
        assert await sync(relay) == 1  # the next apply conflicted: the relay recounted
        await exact(relay, store, ws)
        after = await state.snapshot(ws)
        assert after.epoch != before.epoch
        assert {v.id for v in after.views} == {v.id for v in before.views}

        await store.update_view(ws, vip.id, "V.I.P.", vip.filter, vip.group_by, None)
        bug = await store.create_view(ws, "bugs", {"field": "tags", "operator": "contains",
                                                   "value": "bug"}, None, None)
        await writes(30)
        await store.delete_view(ws, vip.id)
        await writes(10)
        assert await sync(relay) == 0
        await exact(relay, store, ws)
        final = await state.snapshot(ws)
        assert final.epoch == after.epoch
        assert bug.id in {v.id for v in final.views} and vip.id not in {
            v.id for v in final.views}
        await follower.drain()  # a gateway's reader: across the new epoch, exact
        assert follower.counts == final.counts
        assert relay.conflicts == 1
    finally:
        await relay.stop()
        await bus.close()
        await state.close()


async def test_a_view_change_first_after_lost_data_is_recounted_by_the_next_write(
        store: Store, broker: str) -> None:
    """The first entry after the loss changes a view (a partial replace): Redis cannot make
    the lost counters whole from it, so it records no position; the next write's apply
    conflicts and the relay recounts."""
    ws, people, _ = await tenant(store)
    state, bus = RedisState(broker), RedisBus(broker)
    relay = Relay(store, state, bus, clock=lambda: NOW)
    try:
        await relay.start(background=False)
        for i in range(10):
            await store.create_conversation(ws, {"assignee_id": people[i % 3]}, None)
        await relay.sync()
        mine = next(v for v in relay.views(ws) if v.name == "Your inbox")
        lose_data(broker)
        await store.update_view(ws, mine.id, "Mine", mine.filter, mine.group_by,
                                None)  # a rename: the counts stand
        await relay.sync()
        assert await state.position(ws) == 0  # it says it reflects nothing, not wrong counts
        await store.create_conversation(ws, {}, None)
        assert await sync(relay) == 1
        await exact(relay, store, ws)
    finally:
        await relay.stop()
        await bus.close()
        await state.close()


async def test_a_lost_apply_reply_on_redis_is_recognised_as_a_duplicate(
        tmp_path: Path, request: pytest.FixtureRequest) -> None:
    """Each kind of fault on the Redis state's apply, before and after the script ran."""
    async with make_world("sqlite+redis", request.config, tmp_path) as world:
        store: Store = world["store"]
        faults: Faults = world["faults"]
        ws = (await store.create_workspace("A")).id
        relay = relay_of(world)
        await relay.start(background=False)
        follower = Follower(world["bus"], world["state"], ws)
        await follower.reload()
        seen = []
        real = world["state"].apply

        async def watched(*args: Any, **options: Any) -> Any:
            update = await real(*args, **options)
            seen.append(update.duplicate)
            return update

        world["state"].apply = watched
        faults.enabled = True
        for kind in ("lost-reply", "error-after", "timeout", "lost-reply"):
            for i in range(3):
                await store.create_conversation(ws, {"priority": i % 2 == 0}, None)
            faults.once["state.apply"] = kind
            with pytest.raises(FAILURES):
                await relay.sync()
            await relay.sync()
            await assert_exact(relay, store, world["state"], ws, world["clock"])
        assert faults.injected.count("state.apply:lost-reply") == 2
        assert seen.count(True) == 3  # each landed-then-failed apply came back a duplicate
        assert relay.conflicts == 0
        await relay.step()
        await follower.drain()
        assert follower.counts == (await world["state"].snapshot(ws)).counts


#: Examples of the property per store. PostgreSQL (the production store of a Redis broker)
#: runs fewer: an example costs ~2x as much there (~0.18 s against ~0.08 s on SQLite: round
#: trips, and the database is reset before each), and the suite has to stay within its ~8
#: minutes (CI=true) on 2 cores; this adds ~4 s.
SQLITE_EXAMPLES = 30
POSTGRES_EXAMPLES = 20

_state_faults = given(ops=operations(), plan=st.dictionaries(
    st.integers(1, 16), st.sampled_from(["lost-reply", "lost-reply", "error-after", *KINDS]),
    max_size=8))
_health = [HealthCheck.function_scoped_fixture, HealthCheck.too_slow]


@settings(deadline=None, max_examples=SQLITE_EXAMPLES, suppress_health_check=_health)
@_state_faults
async def test_faults_of_the_redis_state_at_any_of_its_calls(
        tmp_path: Path, request: pytest.FixtureRequest, ops: list[tuple[int, tuple[Any, ...]]],
        plan: dict[int, str]) -> None:
    """Like tests/test_faults.py's property, with the faults on the Redis state's calls only
    (lost replies weighted up, and the first apply's reply always lost), so lost replies of
    ``apply`` and ``replace`` come up in every example. On SQLite (cheap)."""
    await exact_after_redis_state_faults("sqlite+redis", request.config, tmp_path, ops, plan)


@settings(deadline=None, max_examples=POSTGRES_EXAMPLES, suppress_health_check=_health)
@_state_faults
@pytest.mark.parametrize("combo", [POSTGRES_REDIS])
async def test_faults_of_the_redis_state_at_any_of_its_calls_on_postgres(
        tmp_path: Path, request: pytest.FixtureRequest, combo: str,
        ops: list[tuple[int, tuple[Any, ...]]], plan: dict[int, str]) -> None:
    """The same on PostgreSQL, the production store of a Redis broker (fewer examples)."""
    await exact_after_redis_state_faults(combo, request.config, tmp_path, ops, plan)


async def exact_after_redis_state_faults(combo: str, config: pytest.Config, tmp_path: Path,
                                         ops: list[tuple[int, tuple[Any, ...]]],
                                         plan: dict[int, str]) -> None:
    async with make_world(combo, config, tmp_path) as world:
        store: Store = world["store"]
        faults: Faults = world["faults"]
        clock: list[int] = world["clock"]
        ws, people, teams = await tenant(store)
        relay = relay_of(world, batch_size=2)
        await relay.start(background=False)
        faults.only = frozenset({"state.apply", "state.replace", "state.snapshot"})
        faults.once["state.apply"] = "lost-reply"  # the first apply lands, its reply is lost
        faults.at, faults.enabled = plan, True
        ids: list[int] = []
        views: list[int] = []
        for steps, op in ops:
            await apply_op(store, ws, people, teams, ids, views, clock, op)
            for _ in range(steps + 1):
                with contextlib.suppress(*FAILURES):
                    await relay.step()
        faults.enabled = False
        await settle(relay, store, clock)
        await assert_exact(relay, store, world["state"], ws, clock)
        assert relay.conflicts == 0


async def test_the_service_runs_on_a_redis_broker(sqlite_url: str, broker: str) -> None:
    service = Service(Settings(store_url=sqlite_url, broker_url=broker, reconcile_every=None,
                               outbox_retention=None, admin_token="lc_admin_test"))
    assert isinstance(service.state, RedisState) and isinstance(service.bus, RedisBus)
    await service.start()
    try:
        ws, _, _ = await tenant(service.store)
        for _ in range(5):
            await service.store.create_conversation(ws, {}, None)
        relay = service.relay
        assert relay is not None  # the default role counts
        await relay.sync()
        await exact(relay, service.store, ws)
        assert (await service.state.snapshot(ws)).position == await service.store.outbox_position()
    finally:
        await service.stop()


async def test_stream_clients_of_a_server_on_redis_converge_through_lost_data(
        tmp_path: Path, broker: str) -> None:
    """The real server (gateway + relay) on a Redis broker: WebSocket and SSE clients apply
    snapshot + deltas through writes, a new view and a loss of Redis's data (a new epoch:
    the hub resyncs, clients get a snapshot) and end equal to GET /counts."""
    async with stream_server(stream_settings(tmp_path, broker_url=broker)) as server, \
            server.client() as http:
        assert isinstance(server.service.bus, RedisBus)
        tenant = await create_tenant(http, server.admin_token)
        p0, p1, _ = tenant.people
        rng = random.Random(5)
        ids: list[int] = []
        await write(http, tenant, rng, ids, 15)
        await quiet(server)
        clients = [StreamClient(server, "ws", tenant.id, p0.token, teammate=p0.id),
                   StreamClient(server, "sse", tenant.id, p1.token, teammate=p1.id),
                   StreamClient(server, "ws", tenant.id, server.admin_token, name="admin")]
        async with contextlib.AsyncExitStack() as stack:
            for client in clients:
                await stack.enter_async_context(client)
                await client.wait_for(lambda m: m.seq >= 0, what="the snapshot")
            await write(http, tenant, rng, ids, 30)
            await create_view(http, tenant, server.admin_token, "VIP", VIP, "assignee_id")
            await write(http, tenant, rng, ids, 20)
            await quiet(server)
            await assert_converged(http, clients)
            epoch = (await server.service.state.snapshot(tenant.id)).epoch

            lose_data(broker)
            await write(http, tenant, rng, ids, 20)
            relay = server.service.relay
            assert relay is not None
            await sync(relay)
            await quiet(server)
            await assert_converged(http, clients)
            assert (await server.service.state.snapshot(tenant.id)).epoch != epoch
            for client in clients:
                assert len(client.model.of("delta")) > 3, client.name
                assert len(client.model.of("snapshot")) >= 2, client.name  # the new epoch
