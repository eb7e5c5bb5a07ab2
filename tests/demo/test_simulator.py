"""The simulator against a real SQLite store and relay: it keeps its rate without bursting,
makes every kind of change through the outbox, retries on version conflicts, keeps the counts
exact, and leaves nothing running once stopped."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest

from livecount.bus import MemoryBus
from livecount.demo.seed import DemoWorkspace, seed_workspace
from livecount.demo.simulator import ACTIONS, Simulator
from livecount.domain import Image, now_us
from livecount.relay import Relay
from livecount.state import MemoryState
from livecount.store import open_store
from livecount.store.base import Counts, Store

pytestmark = pytest.mark.anyio

MINUTE = 60_000_000


class Demo:
    def __init__(self, store: Store, relay: Relay, demo: DemoWorkspace, now: int) -> None:
        self.store, self.relay, self.workspace, self.now = store, relay, demo, now

    async def assert_exact(self) -> None:
        """Once the relay has synced, every counter equals the SQL recount."""
        await self.relay.sync()
        ws = self.workspace.id
        recount = await self.store.recount(ws, self.relay.views(ws), self.now)
        assert recount.position == self.relay.position
        state = (await self.relay.state.snapshot(ws)).counts
        assert nonzero(state) == nonzero(recount.counts)


def nonzero(counts: Counts) -> Counts:
    """A counter that is absent counts 0: compare what is not."""
    return {key: n for key, n in counts.items() if n}


@pytest.fixture
async def demo(sqlite_url: str) -> AsyncIterator[Demo]:
    store = open_store(sqlite_url)
    await store.open()
    bus = MemoryBus()
    now = now_us()  # the relay's clock is frozen, so time filters agree with the recount
    relay = Relay(store, MemoryState(), bus, clock=lambda: now)
    try:
        workspace = await seed_workspace(store, conversations=300, seed=3)
        await relay.start()
        yield Demo(store, relay, workspace, now)
    finally:
        await relay.stop()
        await bus.close()
        await store.close()


class Recording:
    """The store, with the time of every committed conversation write recorded."""

    def __init__(self, store: Store) -> None:
        self._store = store
        self.writes: list[float] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)

    async def create_conversation(self, *args: Any) -> Image:
        image = await self._store.create_conversation(*args)
        self.writes.append(time.monotonic())
        return image

    async def update_conversation(self, *args: Any, **kwargs: Any) -> Image:
        image = await self._store.update_conversation(*args, **kwargs)
        self.writes.append(time.monotonic())
        return image


class Interfering:
    """The store, with someone else writing the conversation just before the next ``times``
    updates: the simulator's ``if_match`` then names a version that is gone."""

    def __init__(self, store: Store, times: int) -> None:
        self._store = store
        self.times = times

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)

    async def update_conversation(self, ws: int, cid: int, patch: Any, if_match: Any) -> Image:
        if self.times > 0:
            self.times -= 1
            current = await self._store.get_conversation(ws, cid)
            await self._store.update_conversation(ws, cid, {"priority": not current.priority},
                                                  None)
        return await self._store.update_conversation(ws, cid, patch, if_match)


async def test_keeps_a_steady_rate(demo: Demo) -> None:
    rate = 100.0
    store = Recording(demo.store)
    simulator = Simulator(store, demo.workspace, rate=rate, seed=11)  # type: ignore[arg-type]
    started = time.monotonic()
    simulator.start()
    await asyncio.sleep(1.0)
    await simulator.stop()
    elapsed = time.monotonic() - started
    assert simulator.changes == len(store.writes)
    # Roughly rate × duration: never ahead of the schedule, at most a little behind it.
    assert 0.6 * rate * elapsed <= simulator.changes <= rate * elapsed + 1
    # A steady schedule, not a burst: by any moment, at most one change per 1/rate elapsed.
    for n, at in enumerate(store.writes, start=1):
        assert n <= rate * (at - started) + 1, f"write {n} came {at - started:.3f}s in"
    await demo.assert_exact()


async def test_every_action_goes_through_the_outbox_and_counts_stay_exact(demo: Demo) -> None:
    simulator = Simulator(demo.store, demo.workspace, rate=1000, seed=5)
    before = await demo.store.outbox_position()
    for _ in range(400):
        await simulator.step()
    assert set(simulator.by_action) == set(ACTIONS)
    assert sum(simulator.by_action.values()) == simulator.changes == 400
    assert 20 <= simulator.by_action["create"] <= 80  # about 10%
    entries = await demo.store.read_outbox(before, 10_000)
    assert len(entries) == simulator.changes  # one committed write per change, none a no-op
    members = {team.id: set(team.member_ids) for team in demo.workspace.teams}
    for entry in entries:
        old, new = entry.before, entry.after
        assert isinstance(new, Image)
        assert old is None or isinstance(old, Image)
        if old is None:  # a new conversation: open, waiting since it arrived
            assert new.state == "open" and new.waiting_since is not None
            assert abs(new.waiting_since - new.created_at) < MINUTE
            continue
        if new.assignee_id != old.assignee_id:  # assigned within the conversation's team
            assert new.team_id is not None and new.assignee_id in members[new.team_id]
        if new.state == "snoozed" and old.state != "snoozed":
            assert new.snoozed_until is not None
            assert 5 * MINUTE - 2_000_000 <= new.snoozed_until - new.updated_at <= 60 * MINUTE
        if new.state == "open" and old.state != "open":
            assert new.snoozed_until is None and new.waiting_since is not None
        if new.state == "closed":
            assert new.waiting_since is None and new.snoozed_until is None
        assert new.mentions - old.mentions <= new.unread_by  # a mention leaves it unread
    await demo.assert_exact()


async def test_retries_when_the_version_moved(demo: Demo) -> None:
    store = Interfering(demo.store, times=2)
    simulator = Simulator(store, demo.workspace, rate=1000, seed=2)  # type: ignore[arg-type]
    before = await demo.store.outbox_position()
    while store.times:
        await simulator.step()
    changed = simulator.changes
    assert simulator.conflicts == 2
    assert simulator.errors == 0
    # Each conflict cost one extra write by "someone else"; the simulator's changes all landed.
    assert await demo.store.outbox_position() - before == changed + 2
    await demo.assert_exact()


async def test_stopping_leaves_no_task(demo: Demo) -> None:
    simulator = Simulator(demo.store, demo.workspace, rate=200, seed=4)
    simulator.start()
    task = simulator.task
    assert task is not None and simulator.running
    with pytest.raises(RuntimeError):
        simulator.start()
    await asyncio.sleep(0.3)
    await simulator.stop()
    assert task.done() and not task.cancelled() and task.exception() is None  # ended itself
    assert simulator.task is None and not simulator.running
    assert not [t for t in asyncio.all_tasks() if t.get_name() == "livecount-demo-simulator"]
    assert simulator.changes > 10
    await simulator.stop()  # stopping twice is harmless
    await demo.assert_exact()


async def test_stopping_in_the_middle_of_a_write(demo: Demo) -> None:
    """Cancelled while a write is in flight: the write commits or not, and counts agree."""
    for delay in (0.0, 0.001, 0.003):
        simulator = Simulator(demo.store, demo.workspace, rate=1000, seed=6)
        simulator.start()
        await asyncio.sleep(delay)
        await simulator.stop()
        assert simulator.task is None
    await demo.assert_exact()


async def test_cancelling_the_task_ends_it(demo: Demo) -> None:
    simulator = Simulator(demo.store, demo.workspace, rate=200, seed=8)
    simulator.start()
    task = simulator.task
    assert task is not None
    await asyncio.sleep(0.1)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await simulator.stop()
    assert simulator.task is None
    # A write cancelled in flight may still commit on the store's thread; nothing after it.
    await asyncio.sleep(0.1)
    await demo.assert_exact()


def test_rejects_a_rate_that_is_not_positive() -> None:
    workspace = DemoWorkspace.__new__(DemoWorkspace)
    with pytest.raises(ValueError):
        Simulator(None, workspace, rate=0)  # type: ignore[arg-type]
