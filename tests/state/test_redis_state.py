"""The Redis counter state against the memory one: random operation sequences applied to both
side by side give the same return values (all but the epoch string) and the same snapshots;
duplicates, conflicts, a reconnect (the epoch stays) and lost data (a new epoch, position 0,
the relay's next apply conflicts) against the real Redis."""

from __future__ import annotations

import asyncio
from typing import Any

import msgspec
import pytest
import redis
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from livecount.exceptions import Unavailable, ValidationError
from livecount.state import MemoryState, StateConflict, open_state
from livecount.state.base import Update
from livecount.state.redis import (
    RedisState,
    decode_counter,
    encode_counter,
    parse_redis_url,
)
from livecount.store.base import Counts, View
from tests.state.redis_support import REDIS_SERVER, delete_prefix, lose_data, prefix_of, scratch_url

pytestmark = [pytest.mark.anyio, pytest.mark.redis]

# -- strategies -----------------------------------------------------------------------------------

groups = st.none() | st.text(max_size=6) | st.sampled_from(["", ":", "=", "a:b", "=x:", "é", "🙂"])
counter_keys = st.tuples(st.integers(1, 4), groups, st.none() | st.integers(1, 3))
deltas = st.dictionaries(counter_keys, st.integers(-3, 3), max_size=6)
values = st.dictionaries(counter_keys, st.integers(-2, 5), max_size=6)

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner,
                                                                  max_size=3),
    max_leaves=8)
views_lists = st.lists(st.builds(
    View, id=st.integers(1, 4), workspace_id=st.integers(1, 2), name=st.text(max_size=10),
    filter=st.dictionaries(st.text(max_size=6), json_values, max_size=3),
    group_by=st.none() | st.sampled_from(["state", "tags", "custom.plan"]),
    owner_id=st.none() | st.integers(1, 3), position=st.integers(0, 9),
    version=st.integers(1, 5)), max_size=3)

workspaces = st.sampled_from([1, 2])
operations = st.lists(st.one_of(
    st.tuples(st.just("apply"), workspaces, deltas, st.sampled_from(["next", "next", "repeat",
                                                                     "any"]),
              st.integers(0, 3), st.integers(0, 6)),
    st.tuples(st.just("replace"), workspaces, values, st.integers(0, 3),
              st.none() | st.frozensets(st.integers(1, 5), max_size=3), views_lists),
    st.tuples(st.just("assign"), workspaces, values),
    st.tuples(st.just("read"), workspaces),
    st.tuples(st.just("lose")),
    st.tuples(st.just("reconnect")),
), min_size=1, max_size=30)


# -- the differential test ------------------------------------------------------------------------


class SideBySide:
    """A MemoryState and a RedisState given the same calls; every answer compared."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.memory = MemoryState()
        self.redis = RedisState(url)
        self.epochs: dict[int, str] = {}  # the Redis epoch each workspace is in
        self.lost: dict[int, str] = {}  # the epoch before the data was lost
        self.counted: set[int] = set()  # workspaces with a recorded position in Redis
        self.last_apply: dict[int, tuple[Counts, int, int]] = {}

    def epoch(self, ws: int, epoch: str) -> None:
        if ws in self.epochs:
            assert epoch == self.epochs[ws], "the epoch changed without a loss of data"
        else:
            assert epoch != self.lost.get(ws), "lost data kept its epoch"
            self.epochs[ws] = epoch

    async def both(self, name: str, ws: int, *args: Any, **kwargs: Any) -> Any:
        outcomes = []
        for state in (self.memory, self.redis):
            try:
                outcomes.append(await getattr(state, name)(ws, *args, **kwargs))
            except StateConflict as exc:
                outcomes.append(("conflict", exc.stored))
        mine, theirs = outcomes
        event(f"{name}: " + ("conflict" if isinstance(theirs, tuple) else
                             "duplicate" if theirs.duplicate else "changed" if theirs.changed
                             else "no change"))
        if isinstance(theirs, Update):
            self.epoch(ws, theirs.epoch)
            assert isinstance(mine, Update)
            assert (theirs.seq, theirs.changed, theirs.duplicate) == (
                mine.seq, mine.changed, mine.duplicate)
        else:
            assert theirs == mine
        return theirs

    async def step(self, op: tuple[Any, ...]) -> None:
        kind = op[0]
        if kind == "apply":
            _, ws, batch, mode, a, b = op
            current = await self.memory.position(ws)
            if mode == "repeat" and ws in self.last_apply:
                batch, position, expect = self.last_apply[ws]
            elif mode == "any":
                position, expect = b, a
            else:
                position, expect = current + a, current
            update = await self.both("apply", ws, batch, position, expect)
            if isinstance(update, Update):
                self.last_apply[ws] = (batch, position, expect)
                if not update.duplicate:
                    self.counted.add(ws)
        elif kind == "replace":
            _, ws, counts, ahead, scope, views = op
            position = await self.memory.position(ws) + ahead
            await self.both("replace", ws, counts, position, scope, views=views)
            if scope is None:
                self.counted.add(ws)
            elif ws not in self.counted:
                event("partial replace of lost data")
                # a partial replace cannot make lost data whole: Redis leaves the position
                # unrecorded (so the relay's next apply conflicts and it recounts)
                assert await self.redis.position(ws) == 0
                self.memory._workspaces[ws].position = 0
        elif kind == "assign":
            await self.both("assign", op[1], op[2])
        elif kind == "read":
            ws = op[1]
            loaded = await self.redis.load(ws)
            if ws in self.counted:
                assert loaded == await self.redis.snapshot(ws)
            else:
                assert loaded is None
        elif kind == "lose":
            lose_data(self.url)
            self.memory = MemoryState()  # what a restart does to it
            self.lost.update(self.epochs)
            self.epochs.clear()
            self.counted.clear()
            self.last_apply.clear()
        elif kind == "reconnect":
            await self.redis.close()
            self.redis = RedisState(self.url)
        for ws in (1, 2):
            mine, theirs = await self.memory.snapshot(ws), await self.redis.snapshot(ws)
            self.epoch(ws, theirs.epoch)
            assert (theirs.seq, theirs.position, theirs.counts, theirs.views) == (
                mine.seq, mine.position, mine.counts, mine.views)
            assert await self.redis.position(ws) == mine.position
            assert 0 not in theirs.counts.values()

    async def close(self) -> None:
        await self.redis.close()
        delete_prefix(prefix_of(self.url))


@settings(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                HealthCheck.too_slow])
@given(ops=operations)
async def test_redis_state_answers_like_the_memory_state(request: pytest.FixtureRequest,
                                                         ops: list[tuple[Any, ...]]) -> None:
    pair = SideBySide(scratch_url(request.config))
    try:
        for op in ops:
            await pair.step(op)
    finally:
        await pair.close()


# -- named cases ---------------------------------------------------------------------------------

A, B = (1, None, None), (2, "vip", 7)


async def test_a_replayed_batch_is_a_duplicate_and_a_stale_one_a_conflict(
        redis_broker: str) -> None:
    state = RedisState(redis_broker)
    try:
        first = await state.apply(1, {A: 2, B: 1}, 10, 0)
        assert (first.seq, first.changed, first.duplicate) == (1, {A: 2, B: 1}, False)
        again = await state.apply(1, {A: 2, B: 1}, 10, 0)  # the reply was lost: sent again
        assert again == Update(first.epoch, 1, {}, duplicate=True)
        with pytest.raises(StateConflict) as conflict:
            await state.apply(1, {A: 1}, 12, 11)
        assert conflict.value.stored == 10
        nothing = await state.apply(1, {A: 0}, 11, 10)  # no change: position only
        assert (nothing.seq, nothing.changed) == (1, {})
        assert await state.position(1) == 11
        gone = await state.apply(1, {A: -2}, 12, 11)
        assert gone.changed == {A: 0}
        snapshot = await state.snapshot(1)
        assert (snapshot.seq, snapshot.position, snapshot.counts) == (2, 12, {B: 1})
    finally:
        await state.close()


async def test_concurrent_applies_of_two_workers_land_once(redis_broker: str) -> None:
    """Two processes' states (own pools) send batches against the same position at once:
    exactly one lands; the other is told it conflicts (or is a duplicate of the same)."""
    one, two = RedisState(redis_broker), RedisState(redis_broker)
    try:
        for round_ in range(20):
            position = await one.position(1)
            results = await asyncio.gather(
                one.apply(1, {A: 1}, position + 1, position),
                two.apply(1, {A: 1}, position + 2, position), return_exceptions=True)
            landed = [r for r in results if isinstance(r, Update) and not r.duplicate]
            assert len(landed) == 1, results
            assert sum(isinstance(r, StateConflict) for r in results) == 1
            assert (await one.snapshot(1)).counts[A] == round_ + 1
    finally:
        await one.close()
        await two.close()


async def test_the_epoch_survives_a_reconnect_and_changes_when_the_data_is_lost(
        redis_broker: str) -> None:
    state = RedisState(redis_broker)
    try:
        first = await state.replace(1, {A: 3}, 5, views=[])
        other = await state.apply(2, {A: 1}, 5, 0)
        await state.close()
        state = RedisState(redis_broker)  # a restarted worker
        assert (await state.snapshot(1)).epoch == first.epoch
        resumed = await state.apply(1, {A: 1}, 6, 5)
        assert (resumed.epoch, resumed.seq, await state.position(1)) == (first.epoch, 2, 6)
        assert other.epoch != first.epoch  # an epoch per workspace: seqs are per workspace

        assert lose_data(redis_broker) > 0  # FLUSHDB, or a restart without persistence
        assert await state.position(1) == 0
        assert await state.load(1) is None
        with pytest.raises(StateConflict) as conflict:  # the relay's next batch
            await state.apply(1, {A: 1}, 7, 6)
        assert conflict.value.stored == 0
        fresh = await state.snapshot(1)
        assert fresh.epoch != first.epoch
        assert (fresh.seq, fresh.position, fresh.counts, fresh.views) == (0, 0, {}, [])
        rebuilt = await state.replace(1, {A: 4}, 7, views=[])  # the relay's recount
        assert (rebuilt.epoch, rebuilt.seq) == (fresh.epoch, 1)
        assert (await state.snapshot(1)).counts == {A: 4}
        assert (await state.apply(1, {A: 1}, 8, 7)).changed == {A: 5}
    finally:
        await state.close()


async def test_a_partial_replace_on_lost_data_leaves_the_position_unrecorded(
        redis_broker: str) -> None:
    """A view's install (or a rename) landing right after the data was lost cannot make the
    counters whole: the position stays 0, so the relay's next apply conflicts and recounts."""
    state = RedisState(redis_broker)
    try:
        await state.replace(1, {A: 3, B: 2}, 5, views=[])
        lose_data(redis_broker)
        update = await state.replace(1, {B: 9}, 6, [2], views=[])
        assert update.changed == {B: 9}
        assert await state.position(1) == 0
        assert await state.load(1) is None
        with pytest.raises(StateConflict):
            await state.apply(1, {A: 1}, 7, 6)
    finally:
        await state.close()


@settings(deadline=None, max_examples=50,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(views=views_lists)
async def test_replace_records_the_views_exactly(redis_broker: str, views: list[View]) -> None:
    state = RedisState(redis_broker)
    try:
        await state.replace(1, {}, 1, views=views)
        stored = (await state.snapshot(1)).views
        assert stored == views
        assert msgspec.json.encode(stored) == msgspec.json.encode(views)  # types too
        assert (await state.load(1)) is not None
    finally:
        await state.close()


@given(key=counter_keys)
def test_counter_fields_round_trip(key: tuple[int, str | None, int | None]) -> None:
    assert decode_counter(encode_counter(key)) == key


async def test_scripts_are_loaded_again_after_a_script_flush(redis_broker: str) -> None:
    """A restarted Redis has forgotten the scripts (NOSCRIPT): they are loaded again."""
    state = RedisState(redis_broker)
    try:
        await state.apply(1, {A: 1}, 1, 0)
        with redis.Redis.from_url(REDIS_SERVER) as client:
            client.script_flush()
        assert (await state.apply(1, {A: 1}, 2, 1)).changed == {A: 2}
        assert (await state.snapshot(1)).counts == {A: 2}
    finally:
        await state.close()


async def test_keys_share_the_workspace_hash_tag(redis_broker: str) -> None:
    state = RedisState(redis_broker)
    try:
        await state.apply(7, {A: 1}, 1, 0)
        prefix = prefix_of(redis_broker)
        assert state.key(7) == f"{prefix}{{ws:7}}:state"
        with redis.Redis.from_url(redis_broker.split("?")[0]) as client:
            assert [k.decode() for k in client.scan_iter(match=f"{prefix}*")] == [state.key(7)]
            assert client.hgetall(state.key(7))[b"1::"] == b"1"
    finally:
        await state.close()


async def test_urls_route_and_options_parse() -> None:
    options = parse_redis_url("redis://u:p@h:1/3?prefix=x:&max_connections=4&socket_timeout=2")
    assert (options.prefix, options.max_connections) == ("x:", 4)
    assert options.server_url == "redis://u:p@h:1/3?socket_timeout=2"
    assert options.key(5, "state") == "x:{ws:5}:state"
    for bad in ("redis://h/0?prefix={x}", "redis://h/0?max_connections=0",
                "redis://h/0?stream_maxlen=many", "http://h/0"):
        with pytest.raises(ValidationError):
            parse_redis_url(bad)
    state = open_state("redis://127.0.0.1:1/0")
    assert isinstance(state, RedisState)
    await state.close()
    with pytest.raises(ValidationError):
        open_state("mysql://x")


async def test_an_unreachable_redis_is_unavailable_not_a_crash() -> None:
    state = RedisState("redis://127.0.0.1:1/0?socket_connect_timeout=0.5")
    try:
        for call in (state.snapshot(1), state.apply(1, {A: 1}, 1, 0), state.position(1),
                     state.replace(1, {}, 1, views=[]), state.assign(1, {A: 1}),
                     state.load(1)):
            with pytest.raises(Unavailable):
                await call
    finally:
        await state.close()
