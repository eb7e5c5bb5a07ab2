"""Fencing of the counter state, on the memory and the Redis backend alike: a write whose fence
is lower than the highest one a workspace has seen is refused (``StateFenced``) and changes
nothing; an equal or higher one goes through and raises the stored fence. A property test
interleaves writes of 2–3 writers with different fences: the state always equals what the
writes the fence let through give on their own, and once the highest fence has written, no
lower one gets through again; the memory and the Redis state answer alike throughout."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from livecount.state import CounterState, MemoryState, StateConflict, StateFenced
from livecount.state.base import StateSnapshot, Update
from livecount.state.redis import RedisState
from livecount.store.base import Counts, View
from tests.state.redis_support import delete_prefix, prefix_of, scratch_url

pytestmark = pytest.mark.anyio

BACKENDS = ["memory", pytest.param("redis", marks=pytest.mark.redis)]

A, B, C = (1, None, None), (2, "vip", None), (2, None, 7)
VIEW_1 = View(1, 1, "All", {}, None, None, 0, 1)
VIEW_2 = View(2, 1, "VIP", {"field": "tags", "operator": "contains", "value": "vip"}, "tags",
              None, 1, 1)
OPS = ["apply", "replace", "assign"]


@pytest.fixture(params=BACKENDS)
async def state(request: pytest.FixtureRequest) -> AsyncIterator[CounterState]:
    if request.param == "memory":
        memory = MemoryState()
        yield memory
        await memory.close()
        return
    url = scratch_url(request.config)
    redis_state = RedisState(url)
    try:
        yield redis_state
    finally:
        await redis_state.close()
        delete_prefix(prefix_of(url))


def seen(snapshot: StateSnapshot) -> tuple[int, int, Counts, list[View]]:
    """What two backends must agree on (the epoch is each one's own)."""
    return snapshot.seq, snapshot.position, snapshot.counts, snapshot.views


async def write(state: CounterState, op: str, ws: int, fence: int) -> Update:
    """A write of kind ``op`` that lands (changes something) unless it is fenced."""
    at = await state.position(ws)
    if op == "apply":
        return await state.apply(ws, {A: 1}, at + 1, at, fence=fence)
    if op == "replace":
        current = (await state.snapshot(ws)).counts
        return await state.replace(ws, {A: current.get(A, 0) + 5, C: 1}, at + 1,
                                   views=[VIEW_1, VIEW_2], fence=fence)
    current = (await state.snapshot(ws)).counts
    return await state.assign(ws, {B: current.get(B, 0) + 2}, fence=fence)


@pytest.mark.parametrize("op", OPS)
async def test_a_lower_fence_is_refused_and_changes_nothing(state: CounterState,
                                                            op: str) -> None:
    await state.replace(1, {A: 2, B: 1}, 5, views=[VIEW_1], fence=7)
    before = await state.snapshot(1)
    for fence in (0, 6):
        with pytest.raises(StateFenced) as refused:
            await write(state, op, 1, fence)
        assert (refused.value.fence, refused.value.stored) == (fence, 7)
        assert await state.snapshot(1) == before  # epoch, seq, position, counts, views
    # the fence check comes first: a refused retry of a batch that landed (a duplicate), and
    # a batch against the wrong position (a conflict), are refused as fenced too
    with pytest.raises(StateFenced):
        await state.apply(1, {A: 1}, 5, 4, fence=6)
    with pytest.raises(StateFenced):
        await state.apply(1, {A: 1}, 9, 8, fence=6)
    assert await state.snapshot(1) == before
    # the refused writes did not move the stored fence: 7 still writes, 6 still does not
    update = await write(state, op, 1, 7)
    assert update.seq == before.seq + 1
    with pytest.raises(StateFenced) as again:
        await write(state, op, 1, 6)
    assert again.value.stored == 7


@pytest.mark.parametrize("op", OPS)
async def test_an_equal_or_higher_fence_writes_and_raises_the_stored_fence(
        state: CounterState, op: str) -> None:
    await state.replace(1, {A: 1}, 1, views=[VIEW_1], fence=3)
    for fence in (3, 3, 8, 8):  # equal, then higher, then equal to the new one
        before = await state.snapshot(1)
        update = await write(state, op, 1, fence)
        after = await state.snapshot(1)
        assert update.seq == after.seq == before.seq + 1
        assert after.counts != before.counts
    # a write of one kind raised the fence for every kind
    for other in OPS:
        for fence in (3, 7):
            with pytest.raises(StateFenced) as refused:
                await write(state, other, 1, fence)
            assert refused.value.stored == 8
    # a higher one again moves it up
    await write(state, op, 1, 12)
    with pytest.raises(StateFenced) as refused:
        await write(state, "apply", 1, 8)
    assert refused.value.stored == 12


async def test_fences_are_per_workspace(state: CounterState) -> None:
    await state.replace(1, {A: 1}, 1, views=[], fence=9)
    await state.replace(2, {A: 1}, 1, views=[], fence=0)  # another workspace: its own fence
    await state.apply(2, {A: 1}, 2, 1, fence=2)
    with pytest.raises(StateFenced):
        await state.apply(1, {A: 1}, 2, 1, fence=2)
    with pytest.raises(StateFenced):
        await state.apply(2, {A: 1}, 3, 2, fence=1)
    assert (await state.snapshot(1)).counts == {A: 1}
    assert (await state.snapshot(2)).counts == {A: 2}


# -- the property -------------------------------------------------------------------------------

counter_keys = st.sampled_from([A, B, C, (1, "x:y", 3)])
deltas = st.dictionaries(counter_keys, st.integers(-2, 3), max_size=3)
values = st.dictionaries(counter_keys, st.integers(0, 4), max_size=3)
view_lists = st.sampled_from([[], [VIEW_1], [VIEW_1, VIEW_2]])

writes = st.one_of(
    # expect: the current position (lands unless fenced), the last apply again (a duplicate)
    # or a stale one (a conflict)
    st.tuples(st.just("apply"), deltas, st.sampled_from(["next", "next", "repeat", "stale"]),
              st.integers(1, 3)),
    st.tuples(st.just("replace"), values, st.integers(0, 2),
              st.none() | st.frozensets(st.sampled_from([1, 2]), max_size=2), view_lists),
    st.tuples(st.just("assign"), values),
)
# (writer, workspace, write)
interleavings = st.lists(st.tuples(st.integers(0, 2), st.sampled_from([1, 2]), writes),
                         min_size=1, max_size=25)
writer_fences = st.lists(st.integers(0, 30), min_size=2, max_size=3, unique=True)


Outcome = tuple[Any, ...]
Call = tuple[Any, ...]


def resolve(write: tuple[Any, ...], position: int, last: Call | None) -> Call:
    """The concrete call a drawn write makes, given the workspace's current position and
    the last apply that landed on it."""
    kind = write[0]
    if kind == "apply":
        _, batch, mode, step = write
        if mode == "repeat" and last is not None:
            return last
        if mode == "stale":
            return ("apply", batch, position + step + 1, position + step)
        return ("apply", batch, position + step, position)
    if kind == "replace":
        _, counts, ahead, scope, views = write
        return ("replace", counts, position + ahead, scope, views)
    return write


async def attempt(state: CounterState, ws: int, call: Call, fence: int) -> Outcome:
    """Make one call; what came of it, as comparable data."""
    try:
        if call[0] == "apply":
            _, batch, new, expect = call
            update = await state.apply(ws, batch, new, expect, fence=fence)
        elif call[0] == "replace":
            _, counts, new, scope, views = call
            update = await state.replace(ws, counts, new, scope, views=views, fence=fence)
        else:
            update = await state.assign(ws, call[1], fence=fence)
    except StateFenced as exc:
        return ("fenced", exc.fence, exc.stored)
    except StateConflict as exc:
        return ("conflict", exc.stored)
    return ("ok", update.seq, update.changed, update.duplicate)


@settings(deadline=None, max_examples=150,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(fences=writer_fences, script=interleavings)
@pytest.mark.parametrize("backend", BACKENDS)
async def test_interleaved_writers_leave_what_the_accepted_writes_give(
        pytestconfig: pytest.Config, backend: str, fences: list[int],
        script: list[tuple[int, int, tuple[Any, ...]]]) -> None:
    """The states under test get every write with its writer's fence; the reference (a
    memory state, no fencing: fence 0 always) only the writes the model says get through.
    The model: a write is refused iff its fence is lower than the highest fence any earlier
    write to the workspace carried that was not refused (refused or not by position: the
    fence is checked, and recorded, first)."""
    url = scratch_url(pytestconfig) if backend == "redis" else None
    states: list[CounterState] = [MemoryState()]
    if url is not None:
        states.append(RedisState(url))  # compared with the memory state, answer by answer
    reference = MemoryState()
    top = max(fences)
    try:
        for target in (*states, reference):
            for ws in (1, 2):  # counted once, so a partial replace means the same on both
                await target.replace(ws, {}, 0, views=[], fence=0)
        highest = {1: 0, 2: 0}  # the model's stored fence
        top_wrote = {1: False, 2: False}
        last: dict[int, Call] = {}
        for writer, ws, what in script:
            fence = fences[writer % len(fences)]
            call = resolve(what, await reference.position(ws), last.get(ws))
            outcomes = [await attempt(s, ws, call, fence) for s in states]
            assert all(o == outcomes[0] for o in outcomes), outcomes  # memory == Redis
            outcome = outcomes[0]
            if fence < highest[ws]:
                event("fenced")
                assert outcome == ("fenced", fence, highest[ws])
            else:
                expected = await attempt(reference, ws, call, 0)
                event(f"let through: {'duplicate' if expected[-1] is True else expected[0]}")
                assert outcome == expected
                highest[ws] = fence
                if call[0] == "apply" and expected[0] == "ok" and not expected[3]:
                    last[ws] = call
            if top_wrote[ws] and fence < top:
                event("a lower fence after the highest one wrote")
                assert outcome[0] == "fenced", "a lower fence wrote after the highest one"
            if fence == top:
                top_wrote[ws] = True
            for w in (1, 2):
                expected_state = seen(await reference.snapshot(w))
                for s in states:
                    assert seen(await s.snapshot(w)) == expected_state
    finally:
        for s in (*states, reference):
            await s.close()
        if url is not None:
            delete_prefix(prefix_of(url))
