"""Time follows the clock: ``older_than``/``newer_than`` views and snoozes change counts with
no write from anyone, within a second of the instant (real clock, real store)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from livecount.bus import MemoryBus
from livecount.domain import format_timestamp, now_us
from livecount.relay import Relay
from livecount.schedule import FlipSchedule, KeyedHeap, ReopenSchedule
from livecount.state import MemoryState
from livecount.store import open_store
from livecount.store.base import Store
from tests.strategies import NOW, conversation_bodies, filters, patches
from tests.test_relay import remap, tenant

pytestmark = pytest.mark.anyio


@pytest.fixture
async def running(sqlite_url: str) -> AsyncIterator[tuple[Store, Relay, int]]:
    store = open_store(sqlite_url)
    await store.open()
    bus = MemoryBus()
    relay = Relay(store, MemoryState(), bus, poll_interval=5.0)  # timers, not polling
    try:
        ws = await store.create_workspace("clock")
        await relay.start()
        yield store, relay, ws.id
    finally:
        await relay.stop()
        await bus.close()
        await store.close()


async def count_of(relay: Relay, ws: int, view_id: int) -> int:
    return (await relay.state.snapshot(ws)).counts.get((view_id, None, None), 0)


async def wait_for(relay: Relay, ws: int, view_id: int, expected: int, limit: float) -> float:
    """Seconds until the view's count is ``expected`` (fails past ``limit``)."""
    started = time.monotonic()
    while await count_of(relay, ws, view_id) != expected:
        if time.monotonic() - started > limit:
            pytest.fail(f"count of view {view_id} never became {expected}")
        await asyncio.sleep(0.01)
    return time.monotonic() - started


async def test_older_and_newer_than_flip_on_time(running: tuple[Store, Relay, int]) -> None:
    store, relay, ws = running
    older = await store.create_view(ws, "waiting > 1 h", {
        "field": "waiting_since", "operator": "older_than", "value": 3600}, None, None)
    newer = await store.create_view(ws, "waiting < 1 h", {
        "field": "waiting_since", "operator": "newer_than", "value": 3600}, None, None)
    flip_in = 1.5
    waiting_since = now_us() - 3_600_000_000 + int(flip_in * 1e6)
    await store.create_conversation(ws, {"waiting_since": format_timestamp(waiting_since)},
                                    None)
    await relay.sync()
    assert await count_of(relay, ws, older.id) == 0
    assert await count_of(relay, ws, newer.id) == 1
    waited = await wait_for(relay, ws, older.id, 1, flip_in + 2)
    assert await count_of(relay, ws, newer.id) == 0
    late = waited - flip_in
    assert late < 1.0, f"the flip landed {late:.3f}s after its instant"
    # Exact against SQL at the same moment: nothing else changed.
    recount = await store.recount(ws, relay.views(ws), now_us())
    assert recount.counts == (await relay.state.snapshot(ws)).counts


async def test_snoozed_conversation_reopens(running: tuple[Store, Relay, int]) -> None:
    store, relay, ws = running
    await relay.sync()
    all_open = next(v for v in relay.views(ws) if v.name == "All")
    until = now_us() + 1_000_000
    image = await store.create_conversation(
        ws, {"state": "snoozed", "snoozed_until": format_timestamp(until)}, None)
    await relay.sync()
    assert await count_of(relay, ws, all_open.id) == 0
    waited = await wait_for(relay, ws, all_open.id, 1, 3.0)
    assert waited < 2.0
    reopened = await store.get_conversation(ws, image.id)
    assert reopened.state == "open" and reopened.snoozed_until is None
    assert reopened.version == image.version + 1  # a real write, through the outbox


async def test_a_changed_conversation_keeps_its_new_snooze(
        running: tuple[Store, Relay, int]) -> None:
    """A reopen scheduled for an old version never overrides a newer one."""
    store, relay, ws = running
    soon = format_timestamp(now_us() + 300_000)
    later = format_timestamp(now_us() + 3_600_000_000)
    image = await store.create_conversation(ws, {"state": "snoozed", "snoozed_until": soon},
                                            None)
    await relay.sync()
    await store.update_conversation(ws, image.id, {"snoozed_until": later}, None)
    await relay.sync()
    await asyncio.sleep(0.8)
    current = await store.get_conversation(ws, image.id)
    assert current.state == "snoozed" and current.version == image.version + 1


def test_flip_schedule_holds_one_entry_per_conversation() -> None:
    from livecount.conversations import apply_patch, new_image, validate_body

    schedule = FlipSchedule()
    image = new_image(1, 1, validate_body({"waiting_since": "2024-01-01T00:00:00Z"},
                                          patch=False), None, 0)
    timers = {(7, "waiting_since", 10), (7, "waiting_since", 20), (8, "waiting_since", 10)}
    schedule.watch(image, timers, 0)
    for version in range(2, 400):
        image = apply_patch(image, validate_body({"priority": version % 2 == 0}, patch=True), 0)
        schedule.watch(image, timers, 0)
        assert len(schedule) == 1  # superseded at once, not when due
    schedule.extend(image, {(9, "waiting_since", 10)}, 0)  # a view installed later
    due = schedule.due(1 << 62)
    assert [(i.version, [(t - image.waiting_since, set(v)) for t, v in flips])
            for i, flips in due] == [(image.version, [(10, {7, 8, 9}), (20, {7})])]
    assert len(schedule) == 1  # reading what is due removes nothing
    schedule.consume(image, image.waiting_since + 10)
    assert [[t - image.waiting_since for t, _ in flips] for _, flips in schedule.due(1 << 62)
            ] == [[20]]
    schedule.watch(apply_patch(image, validate_body({"waiting_since": None}, patch=True), 0),
                   timers, 0)
    assert len(schedule) == 0  # no instant ahead: no entry


def test_reopen_schedule_replaces_and_drops_at_once() -> None:
    from livecount.conversations import apply_patch, new_image, validate_body

    schedule = ReopenSchedule()
    image = new_image(5, 2, validate_body({"state": "snoozed",
                                           "snoozed_until": "2030-01-01T00:00:00Z"},
                                          patch=False), None, 0)
    for _ in range(2000):
        image = apply_patch(image, validate_body({"priority": not image.priority},
                                                 patch=True), 0)
        schedule.watch(image)
    assert len(schedule) == 1
    assert schedule.due(1 << 62, 10) == [(2, 5, image.version)]
    schedule.done(2, 5, image.version - 1)  # an older version's write: keeps the current one
    assert len(schedule) == 1
    schedule.done(2, 5, image.version)
    assert len(schedule) == 0
    schedule.watch(image)
    schedule.watch(apply_patch(image, validate_body({"state": "open"}, patch=True), 0))
    assert len(schedule) == 0


@given(st.lists(st.tuples(st.sampled_from(["set", "remove"]), st.integers(0, 30),
                          st.integers(0, 100)), max_size=200), st.integers(-1, 101))
def test_keyed_heap_matches_a_dict(ops: list[tuple[str, int, int]], until: int) -> None:
    heap: KeyedHeap[int, int] = KeyedHeap()
    model: dict[int, int] = {}
    for op, key, priority in ops:
        if op == "set":
            heap.set(key, priority, -priority)
            model[key] = priority
        else:
            heap.remove(key)
            model.pop(key, None)
        assert len(heap) == len(model)
        assert heap.peek() == (min(model.values()) if model else None)
    assert sorted((p, k) for p, k, _ in heap.due(until)) == sorted(
        (p, k) for k, p in model.items() if p <= until)


# -- differential: engine + flips vs SQL at every instant of a fake clock ---------------------


_SPANS = (0, 1800, 3600, 86400)
_STEPS_US = (0, 1, 1_800_000_000, 3_600_000_000, 86_400_000_000)


@st.composite
def timed_filters(draw: st.DrawFn) -> dict[str, Any]:
    clock = {"field": draw(st.sampled_from(["waiting_since", "snoozed_until", "created_at",
                                             "updated_at"])),
             "operator": draw(st.sampled_from(["older_than", "newer_than"])),
             "value": draw(st.sampled_from(_SPANS))}
    shape = draw(st.sampled_from(["alone", "and", "or", "not"]))
    if shape == "alone":
        return clock
    if shape == "not":
        return {"operator": "NOT", "value": clock}
    other = draw(filters(max_depth=2))
    return {"operator": shape.upper(), "value": [clock, other]}


@settings(deadline=None, max_examples=30,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=st.data())
async def test_counts_follow_a_moving_clock(sqlite_url: str, data: st.DataObject) -> None:
    clock = [NOW]
    store = open_store(sqlite_url.replace(".db", f"-{data.draw(st.integers(0, 1 << 30))}.db"))
    await store.open()
    bus = MemoryBus()
    relay = Relay(store, MemoryState(), bus, clock=lambda: clock[0], poll_interval=0.05)
    try:
        ws, people, teams = await tenant(store)
        for spec in data.draw(st.lists(timed_filters(), min_size=1, max_size=3)):
            await store.create_view(ws, "timed", spec, data.draw(st.sampled_from(
                [None, "state", "tags"])), None)
        await relay.start()
        ids = [(await store.create_conversation(ws, remap(body, people, teams), None)).id
               for body in data.draw(st.lists(conversation_bodies(), min_size=1, max_size=5))]
        for _ in range(data.draw(st.integers(1, 6))):
            clock[0] += data.draw(st.sampled_from(_STEPS_US))
            if data.draw(st.booleans()):
                await store.update_conversation(ws, data.draw(st.sampled_from(ids)),
                                                remap(data.draw(patches()), people, teams),
                                                None)
            for _attempt in range(50):
                await relay.sync()
                await relay.step()  # the flips due at this clock (the fake one stands still)
                async with relay.lock:
                    recount = await store.recount(ws, relay.views(ws), clock[0])
                    if recount.position != relay.position:
                        continue
                    state = await relay.state.snapshot(ws)
                assert state.counts == recount.counts
                break
            else:
                pytest.fail("the relay never caught up with the store")
    finally:
        await relay.stop()
        await bus.close()
        await store.close()
