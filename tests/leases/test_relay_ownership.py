"""Relays sharing the counting under leases: two relays (counter workers) over one SQLite store
and one Redis counter state and bus, each with its own leases on the same key prefix.

Every workspace is counted by exactly one relay, with the fence of that relay's lease, and its
counts equal the SQL recount; a rebalance (a second relay joins) hands shards over without a
single StateConflict; and a stale owner (its lease ended in Redis, it has not noticed) that
tries to commit is refused with StateFenced, drops the workspace, and leaves the new owner's
counts exactly as they were."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from livecount.bus.redis import RedisBus
from livecount.leases.redis import RedisLeases
from livecount.relay import Relay
from livecount.state import StateConflict, StateFenced
from livecount.state.base import Update
from livecount.state.redis import RedisState
from livecount.store import open_store
from livecount.store.base import Counts, Store, View
from tests.leases.test_redis_leases import ALL, SHARDS, Kit, converge, until
from tests.state.redis_support import delete_prefix, prefix_of, scratch_url
from tests.strategies import NOW
from tests.test_relay import tenant

pytestmark = [pytest.mark.anyio, pytest.mark.redis]

class RecordingState(RedisState):
    """The Redis state, noting every write it refused as fenced: (operation, workspace,
    the fence the write carried)."""

    def __init__(self, url: str) -> None:
        super().__init__(url)
        self.fenced: list[tuple[str, int, int]] = []

    async def apply(self, workspace_id: int, deltas: Counts, position: int, expect: int, *,
                    fence: int = 0) -> Update:
        try:
            return await super().apply(workspace_id, deltas, position, expect, fence=fence)
        except StateFenced:
            self.fenced.append(("apply", workspace_id, fence))
            raise

    async def replace(self, workspace_id: int, counts: Counts, position: int,
                      view_ids: Iterable[int] | None = None, *, views: Sequence[View],
                      fence: int = 0) -> Update:
        try:
            return await super().replace(workspace_id, counts, position, view_ids,
                                         views=views, fence=fence)
        except StateFenced:
            self.fenced.append(("replace", workspace_id, fence))
            raise

    async def assign(self, workspace_id: int, values: Counts, *, fence: int = 0) -> Update:
        try:
            return await super().assign(workspace_id, values, fence=fence)
        except StateFenced:
            self.fenced.append(("assign", workspace_id, fence))
            raise


@dataclass
class Node:
    """One counter worker: its leases, its connections to the state and bus, its relay."""

    name: str
    leases: RedisLeases
    state: RecordingState
    bus: RedisBus
    relay: Relay
    started: bool = False

    async def start(self, *, background: bool = False) -> None:
        """What Service.start does: the first share of leases, then the relay (with the
        background rounds and steps, or driven by the test)."""
        if background:
            relay = self.relay
            await self.leases.start(position=lambda: relay.position)
        self.started = True
        await self.relay.start(background=background)


@dataclass
class Tenant:
    people: list[int]
    teams: list[int]
    conversations: list[int] = field(default_factory=list)


class Cluster(Kit):
    """Nodes on one key prefix and one store; all stopped and closed at the end."""

    def __init__(self, url: str, store: Store) -> None:
        super().__init__(url)
        self.store = store
        self.nodes: list[Node] = []
        self.tenants: dict[int, Tenant] = {}
        self.rng = random.Random(7)

    def node(self, name: str, *, ttl: float = 10.0, **options: Any) -> Node:
        leases, state, bus = self.worker(name, ttl=ttl), RecordingState(self.url), RedisBus(
            self.url)
        relay = Relay(self.store, state, bus, clock=lambda: NOW, ownership=leases, **options)
        node = Node(name, leases, state, bus, relay)
        self.nodes.append(node)
        return node

    async def close(self) -> None:
        for node in self.nodes:  # the relays stop writing before the leases go back
            await node.relay.stop()
        await super().close()
        for node in self.nodes:
            await node.bus.close()
            await node.state.close()

    async def tenants_(self, count: int) -> list[int]:
        made = []
        for _ in range(count):
            ws, people, teams = await tenant(self.store)
            self.tenants[ws] = Tenant(people, teams)
            made.append(ws)
        return made

    async def write(self, n: int, workspaces: Iterable[int] | None = None) -> set[int]:
        """``n`` conversation writes, spread over ``workspaces`` (all by default) so that
        each gets at least one when ``n`` allows; the workspaces written."""
        rng = self.rng
        chosen = sorted(self.tenants if workspaces is None else workspaces)
        touched = set()
        for i in range(n):
            ws = chosen[i] if i < len(chosen) else rng.choice(chosen)
            t = self.tenants[ws]
            if t.conversations and rng.random() < 0.6:
                await self.store.update_conversation(ws, rng.choice(t.conversations), {
                    "state": rng.choice(["open", "closed"]),
                    "assignee_id": rng.choice([None, *t.people]),
                    "tags": rng.sample(["vip", "bug", "billing"], rng.randint(0, 2))}, None)
            else:
                t.conversations.append((await self.store.create_conversation(ws, {
                    "team_id": rng.choice([None, *t.teams]),
                    "assignee_id": rng.choice([None, *t.people]),
                    "tags": ["vip"] * rng.randint(0, 1)}, t.people[0])).id)
            touched.add(ws)
        return touched

    def stored_fence(self, ws: int) -> int:
        with self.raw() as client:
            value = client.hget(f"{self.prefix}{{ws:{ws}}}:state", "_fence")
        return int(value or 0)

    async def sync(self, nodes: Iterable[Node] | None = None) -> None:
        for node in self.nodes if nodes is None else nodes:
            if node.started:
                await node.relay.sync()

    async def assert_counted_once_and_exact(self, nodes: list[Node] | None = None,
                                            workspaces: Iterable[int] | None = None) -> None:
        """Each workspace: counted (built, its views known) by exactly one of ``nodes``, the
        one whose lease holds its shard; the state carries that lease's fence, and equals
        the SQL recount at the same outbox position."""
        nodes = [n for n in (self.nodes if nodes is None else nodes) if n.started]
        await self.sync(nodes)
        position = await self.store.outbox_position()
        for ws in sorted(self.tenants if workspaces is None else workspaces):
            counting = [n.name for n in nodes if n.relay.views(ws)]
            owning = [n.name for n in nodes if n.leases.fence(ws) is not None]
            assert counting == owning and len(counting) == 1, (ws, counting, owning)
            owner = next(n for n in nodes if n.name == counting[0])
            assert owner.relay.position == position
            recount = await self.store.recount(ws, owner.relay.views(ws), NOW)
            assert recount.position == position
            snapshot = await owner.state.snapshot(ws)
            assert snapshot.counts == recount.counts, ws
            assert {v.id for v in snapshot.views} == {v.id for v in owner.relay.views(ws)}
            assert self.stored_fence(ws) == owner.leases.fence(ws)


@pytest.fixture
async def cluster(tmp_path: Path, request: pytest.FixtureRequest) -> AsyncIterator[Cluster]:
    url = scratch_url(request.config)  # (skips, or fails with CI=true, without Redis)
    store = open_store(f"sqlite:///{tmp_path}/ownership-{random.getrandbits(32)}.db")
    await store.open()
    made = Cluster(url, store)
    try:
        yield made
    finally:
        try:
            await made.close()
        finally:
            await store.close()
            delete_prefix(prefix_of(url))


def owned(node: Node, workspaces: Iterable[int]) -> list[int]:
    return [ws for ws in workspaces if node.leases.fence(ws) is not None]


# -- split ------------------------------------------------------------------------------------


async def test_each_workspace_is_counted_by_exactly_one_relay(cluster: Cluster) -> None:
    workspaces = await cluster.tenants_(6)  # shards 1..6 of 8
    await cluster.write(40)
    a, b = cluster.node("a"), cluster.node("b")
    await converge([a.leases, b.leases], rounds=4)
    assert owned(a, workspaces) and owned(b, workspaces)  # both have some
    await a.start()
    await b.start()
    await cluster.assert_counted_once_and_exact()
    await cluster.write(60)
    ws_a, ws_b = owned(a, workspaces)[0], owned(b, workspaces)[0]
    for ws in (ws_a, ws_b):  # a view counted in the background, installed by the owner
        await cluster.store.create_view(ws, "VIP", {"field": "tags", "operator": "contains",
                                                    "value": "vip"}, "assignee_id", None)
    await cluster.write(30)
    await cluster.assert_counted_once_and_exact()
    for node in (a, b):
        assert node.relay.conflicts == 0 and node.relay.errors == 0
        assert node.relay.entries_applied > 0 and node.state.fenced == []
    assert any(v.name == "VIP" for v in a.relay.views(ws_a))
    assert any(v.name == "VIP" for v in b.relay.views(ws_b))


# -- rebalance --------------------------------------------------------------------------------


async def test_a_second_relay_joining_takes_shards_over_without_conflicts(
        cluster: Cluster) -> None:
    workspaces = await cluster.tenants_(6)
    await cluster.write(30)
    a = cluster.node("a")
    await a.leases.run_round()
    await a.start()
    await cluster.write(20)
    await cluster.assert_counted_once_and_exact()
    assert owned(a, workspaces) == workspaces

    b = cluster.node("b")
    await b.leases.run_round()  # alive: a's fair share drops to half
    await b.start()  # owns nothing yet: counts nothing
    await cluster.write(20)
    await cluster.assert_counted_once_and_exact()
    await a.leases.run_round()  # a gives half its shards back, the relay dropping first
    given = [ws for ws in workspaces if ws % SHARDS not in a.leases.held]
    # (the shards kept are spread over the range: both halves of workspaces 1..6 get some)
    assert len(given) == 3
    assert given and all(a.relay.views(ws) == [] for ws in given)
    assert all(cluster.value(ws % SHARDS) is None for ws in given)
    await cluster.write(20)  # nobody owns those now: nobody applies these (b counts them)
    await cluster.sync()
    await b.leases.run_round()  # b takes them, and counts them from scratch
    assert owned(b, workspaces) == given
    await cluster.write(40)
    await cluster.assert_counted_once_and_exact()
    for node in (a, b):
        assert node.relay.conflicts == 0 and node.relay.errors == 0
        assert node.state.fenced == []


async def test_a_rebalance_under_the_background_rounds_is_exact(cluster: Cluster) -> None:
    ttl = 1.5  # a lease round every ~0.5 s
    workspaces = await cluster.tenants_(6)
    a = cluster.node("a", ttl=ttl, poll_interval=0.05)
    b = cluster.node("b", ttl=ttl, poll_interval=0.05)
    await a.start(background=True)
    await cluster.write(20)
    stop = asyncio.Event()

    async def traffic() -> None:
        while not stop.is_set():
            await cluster.write(3)
            await asyncio.sleep(0.01)

    writer = asyncio.create_task(traffic())
    try:
        await b.start(background=True)
        await until(lambda: a.leases.held | b.leases.held == ALL
                    and len(a.leases.held) == len(b.leases.held) == SHARDS // 2,
                    5 * ttl, "a fair split")
        await asyncio.sleep(0.2)  # writes after the handover too
    finally:
        stop.set()
        await writer
    await cluster.assert_counted_once_and_exact()
    assert owned(a, workspaces) and owned(b, workspaces)
    for node in (a, b):
        assert node.relay.conflicts == 0 and node.state.fenced == []


# -- a stale owner ----------------------------------------------------------------------------


async def test_a_stale_owner_is_fenced_and_drops_the_workspace(cluster: Cluster) -> None:
    workspaces = await cluster.tenants_(3)
    await cluster.write(30)
    a = cluster.node("a")
    await a.leases.run_round()
    await a.start()
    await cluster.write(30)
    await cluster.assert_counted_once_and_exact()
    old = {ws: a.leases.fence(ws) for ws in workspaces}

    # a's leases end in Redis (expired while it was paused, say); a has not noticed: its
    # local validity still runs, so it still believes it owns every shard
    cluster.delete_leases()
    b = cluster.node("b")
    await b.leases.run_round()
    assert b.leases.held == ALL
    new = {ws: b.leases.fence(ws) for ws in workspaces}
    assert all(new[ws] > old[ws] for ws in workspaces)  # type: ignore[operator]
    await b.start()  # b counts every workspace from scratch, with its higher fences
    assert owned(a, workspaces) == workspaces  # a still believes
    await cluster.assert_counted_once_and_exact([b])
    assert all(cluster.stored_fence(ws) == new[ws] for ws in workspaces)

    touched = await cluster.write(30)
    assert touched == set(workspaces)
    before = {ws: await b.state.snapshot(ws) for ws in workspaces}
    await a.relay.step()  # a commits its batch of each workspace: every one is refused
    assert sorted(a.state.fenced) == [("apply", ws, old[ws]) for ws in workspaces]
    assert {ws: await b.state.snapshot(ws) for ws in workspaces} == before  # nothing landed
    for ws in workspaces:  # a dropped the workspaces, and the leases it held on them
        assert a.relay.views(ws) == [] and a.leases.fence(ws) is None
    assert a.leases.lost_leases == len(workspaces)
    assert a.relay.conflicts == 0  # fenced: dropped, not recounted

    await cluster.write(20)
    await cluster.sync()  # a goes on without writing them, b counts them
    assert len(a.state.fenced) == len(workspaces)
    await cluster.assert_counted_once_and_exact()
    assert b.relay.conflicts == 0 and b.state.fenced == []


async def test_a_stale_owner_that_recounts_is_fenced_and_drops_the_workspace(
        cluster: Cluster) -> None:
    """The stale write is a recount: a relay that has just (re)taken a shard counts its
    workspaces from scratch at its next step, but its lease on that shard ended in Redis
    meanwhile and the new owner has counted them with a higher fence. The recount is
    refused like an apply; the relay drops the workspace and goes on with the others."""
    _, late = await cluster.tenants_(2)  # shards 1 and 2
    a = cluster.node("a")
    await a.leases.run_round()
    await a.start()
    await cluster.write(20)
    await cluster.sync()
    a.leases.lost(late)  # a loses the shard of ``late`` ...
    await a.relay.step()  # ... and forgets the workspace
    assert a.relay.views(late) == []
    cluster.delete_leases(frozenset({late % SHARDS}))  # (its lease there ended)
    await cluster.write(10)
    await cluster.sync()
    await a.leases.run_round()  # a takes the shard again, with a new fence: its relay
    stale = a.leases.fence(late)  # will count ``late`` from scratch at its next step ...
    assert stale is not None
    cluster.delete_leases(frozenset({late % SHARDS}))  # ... but that lease ends at once,
    b = cluster.node("b")
    await b.leases.run_round()  # and b takes the shard, with a higher fence
    assert b.leases.held == frozenset({late % SHARDS})
    await b.start()  # and counts ``late``
    await cluster.write(10)  # both workspaces move on
    assert a.leases.fence(late) == stale  # a has not noticed
    await a.relay.sync()  # a's recount of ``late`` is refused; the other one is a's
    assert a.state.fenced == [("replace", late, stale)]
    assert a.relay.views(late) == [] and a.leases.fence(late) is None
    await cluster.assert_counted_once_and_exact()
    assert a.relay.conflicts == 0 and b.relay.conflicts == 0 and b.state.fenced == []


async def test_a_shard_given_back_while_the_relay_recounts_one_of_its_workspaces(
        cluster: Cluster, monkeypatch: pytest.MonkeyPatch) -> None:
    """A rebalance that gives a shard back while the relay is counting one of its
    workspaces from scratch (after lost Redis data, say): the count is abandoned, without
    an error, and the new owner counts the workspace."""
    workspaces = await cluster.tenants_(5)
    late = workspaces[-1]  # shard 5: among the highest, given back when b joins
    assert late % SHARDS >= SHARDS // 2
    a = cluster.node("a")
    await a.leases.run_round()
    await a.start()
    await cluster.write(30)
    await cluster.sync()
    with cluster.raw() as client:  # Redis lost the workspace's counters
        client.delete(f"{cluster.prefix}{{ws:{late}}}:state")
    await cluster.write(5, [late])
    with pytest.raises(StateConflict):  # a's next batch finds them gone: recount due
        await a.relay.step()
    assert a.relay.conflicts == 1

    b = cluster.node("b")
    await b.leases.run_round()  # alive: a's share is half now
    await b.start()
    gate, entered = asyncio.Event(), asyncio.Event()
    snapshot = cluster.store.snapshot

    async def slow_snapshot(workspace_id: int) -> Any:
        if workspace_id == late and not gate.is_set():
            entered.set()
            await gate.wait()
        return await snapshot(workspace_id)

    monkeypatch.setattr(cluster.store, "snapshot", slow_snapshot)
    step = asyncio.create_task(a.relay.step())  # a recounts ``late`` ...
    rebalance: asyncio.Task[None] | None = None
    try:
        await asyncio.wait_for(entered.wait(), 5)
        rebalance = asyncio.create_task(a.leases.run_round())  # ... as its shard goes back
        await until(lambda: a.leases.fence(late) is None, 5, "a gives the shard back")
    finally:
        gate.set()
        try:
            await step  # the count is abandoned: the workspace is not a's any more
        finally:
            if rebalance is not None:
                await rebalance
    assert a.relay.views(late) == [] and a.state.fenced == []
    await b.leases.run_round()
    await cluster.write(20)
    await cluster.assert_counted_once_and_exact()
    assert b.relay.conflicts == 0 and a.relay.conflicts == 1


async def test_a_shard_given_back_while_the_relay_counts_a_new_workspace_of_it(
        cluster: Cluster, monkeypatch: pytest.MonkeyPatch) -> None:
    """A workspace created after the relay started is counted from scratch when its first
    entries come; its shard goes back (a rebalance) during that count: the count is
    abandoned without an error, and the new owner counts it."""
    workspaces = await cluster.tenants_(4)
    a = cluster.node("a")
    await a.leases.run_round()
    await a.start()
    await cluster.write(20)
    await cluster.sync()
    b = cluster.node("b")
    await b.leases.run_round()  # alive: a's share is half now
    await b.start()
    (late,) = await cluster.tenants_(1)  # shard 5: among the highest, given back
    assert late % SHARDS >= SHARDS // 2
    await cluster.write(5, [late])
    gate, entered = asyncio.Event(), asyncio.Event()
    snapshot = cluster.store.snapshot

    async def slow_snapshot(workspace_id: int) -> Any:
        if workspace_id == late and not gate.is_set():
            entered.set()
            await gate.wait()
        return await snapshot(workspace_id)

    monkeypatch.setattr(cluster.store, "snapshot", slow_snapshot)
    step = asyncio.create_task(a.relay.step())  # a counts ``late`` ...
    rebalance: asyncio.Task[None] | None = None
    try:
        await asyncio.wait_for(entered.wait(), 5)
        rebalance = asyncio.create_task(a.leases.run_round())  # ... as its shard goes back
        await until(lambda: a.leases.fence(late) is None, 5, "a gives the shard back")
    finally:
        gate.set()
        try:
            await step  # the count is abandoned: the workspace is not a's any more
        finally:
            if rebalance is not None:
                await rebalance
    assert a.relay.views(late) == [] and a.state.fenced == []
    await b.leases.run_round()
    await cluster.write(20)
    await cluster.assert_counted_once_and_exact(workspaces=[*workspaces, late])
    for node in (a, b):
        assert node.relay.conflicts == 0 and node.state.fenced == []
