"""Time follows the clock: ``older_than``/``newer_than`` views and snoozes change counts with
no write from anyone, within a second of the instant (real clock, real store)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest

from livecount.bus import MemoryBus
from livecount.domain import format_timestamp, now_us
from livecount.relay import Relay
from livecount.schedule import FlipSchedule
from livecount.state import MemoryState
from livecount.store import open_store
from livecount.store.base import Store

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


def test_flip_schedule_skips_superseded_versions_and_compacts() -> None:
    from livecount.conversations import apply_patch, new_image, validate_body

    schedule = FlipSchedule()
    image = new_image(1, 1, validate_body({"waiting_since": "2024-01-01T00:00:00Z"},
                                          patch=False), None, 0)
    timers = {(7, "waiting_since", 10), (7, "waiting_since", 20), (8, "waiting_since", 10)}
    current = {1: 1}
    schedule.watch(image, timers, 0)
    for version in range(2, 400):
        image = apply_patch(image, validate_body({"priority": version % 2 == 0}, patch=True), 0)
        current[1] = image.version
        schedule.watch(image, timers, 0)
        schedule.compact(current.__getitem__)
    assert len(schedule) < 300  # superseded entries are dropped, not kept forever
    schedule.watch(image, {(9, "waiting_since", 10)}, 0)  # a view installed later
    due = list(schedule.due(1 << 62, current.__getitem__))
    assert [(i.version, views) for _, i, views in due] == [
        (current[1], {7, 8, 9}), (current[1], {7})]


# -- differential: engine + flips vs SQL at every instant of a fake clock ---------------------

from typing import Any  # noqa: E402

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from tests.strategies import NOW, conversation_bodies, filters, patches  # noqa: E402
from tests.test_relay import remap, tenant  # noqa: E402

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
