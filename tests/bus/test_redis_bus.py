"""The Redis Streams bus against the memory bus where they must agree (``since``: contiguity,
resets, epochs, duplicates; subscriptions: order, overflow), and on its own where Redis is
the point: fan-out of one reader to many subscriptions, MAXLEN trimming, a killed reader
connection, lost data, an unreachable server."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from typing import Any

import psutil
import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import livecount.bus.redis as redis_bus
from livecount.bus import MemoryBus, Overflow, open_bus
from livecount.bus.base import BusMessage
from livecount.bus.redis import RedisBus
from livecount.exceptions import Unavailable
from livecount.store.base import View
from tests.state.redis_support import delete_prefix, lose_data, prefix_of, scratch_url

pytestmark = [pytest.mark.anyio, pytest.mark.redis]

Event = BusMessage | str  # a message, or "overflow"


async def drain(bus: Any, subscription: Any) -> list[Event]:
    """Everything a subscription holds once the bus has handed out all that was published."""
    if isinstance(bus, RedisBus):
        await bus.sync()
    out: list[Event] = []
    while not subscription._queue.empty():
        try:
            out.append(await anext(subscription))
        except Overflow:
            out.append("overflow")
    return out


def message(ws: int, epoch: str, seq: int, kind: str = "delta", **counts: int) -> BusMessage:
    values = {(int(k[1:]), None, None): v for k, v in counts.items()}
    views = [View(1, ws, "All", {"field": "state", "operator": "=", "value": "open"}, None,
                  None, 0, 1)] if kind == "views" else None
    return BusMessage(ws, epoch, seq, kind, values, views)  # type: ignore[arg-type]


# -- against the memory bus ---------------------------------------------------------------------

@st.composite
def histories(draw: st.DrawFn) -> list[BusMessage]:
    """What a relay publishes, with its accidents: retried publishes (duplicates), resets,
    seq gaps (a message lost), new epochs (seqs start again)."""
    epoch, seq = "e0", 0
    out: list[BusMessage] = []
    for i in range(draw(st.integers(1, 25))):
        step = draw(st.sampled_from(["next", "next", "next", "dup", "gap", "reset", "views",
                                     "epoch"]))
        if step == "dup" and out:
            out.append(out[-1])
            continue
        if step == "epoch":
            epoch, seq = f"e{i + 1}", 0
        seq += 2 if step == "gap" else 1
        kind = step if step in ("reset", "views") else "delta"
        out.append(message(1, epoch, seq, kind, v1=i, v2=draw(st.integers(0, 3))))
    return out


@settings(deadline=None, max_examples=60,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(history=histories(), queries=st.lists(st.tuples(st.integers(0, 30), st.integers(0, 30)),
                                              max_size=12))
async def test_since_and_delivery_agree_with_the_memory_bus(
        request: pytest.FixtureRequest, history: list[BusMessage],
        queries: list[tuple[int, int]]) -> None:
    url = scratch_url(request.config)
    memory, bus = MemoryBus(), RedisBus(url)
    try:
        mine, theirs = memory.subscribe(1, 1000), bus.subscribe(1, 1000)
        for item in history:
            await memory.publish(item)
            await bus.publish(item)
        epochs = [*sorted({m.epoch for m in history}), "nope"]
        for e, s in queries:
            epoch = epochs[e % len(epochs)]
            assert await bus.since(1, epoch, s) == await memory.since(1, epoch, s), (epoch, s)
        # the memory bus hands a retried publish to subscribers again; Redis drops it when it
        # publishes (a reader skips it by seq either way): otherwise the same, in order
        expected = []
        for item in await drain(memory, mine):
            assert isinstance(item, BusMessage)
            last = expected[-1] if expected else None
            if last is None or last.epoch != item.epoch or last.seq < item.seq:
                expected.append(item)
        assert await drain(bus, theirs) == expected
    finally:
        await bus.close()
        await memory.close()
        delete_prefix(prefix_of(url))


@pytest.mark.parametrize("maxsize", [1, 3])
async def test_a_full_subscription_overflows_like_the_memory_one(redis_broker: str,
                                                                 maxsize: int) -> None:
    memory, bus = MemoryBus(), RedisBus(redis_broker)
    try:
        subs = [memory.subscribe(1, maxsize), bus.subscribe(1, maxsize)]
        await bus.sync()
        events: list[list[Event]] = [[], []]
        for rounds in ((1, 2, 3, 4, 5), (6,), (7, 8)):
            for seq in rounds:
                for b in (memory, bus):
                    await b.publish(message(1, "e", seq, v1=seq))
            for i, b in enumerate((memory, bus)):
                events[i] += await drain(b, subs[i])
        assert events[1] == events[0]
        assert "overflow" in events[0]
    finally:
        await bus.close()
        await memory.close()


async def test_duplicates_never_break_since(redis_broker: str) -> None:
    bus = RedisBus(redis_broker)
    try:
        for seq in (1, 2, 2, 3, 3, 3):
            await bus.publish(message(1, "e", seq, v1=seq))
        # a duplicate that reached the stream some other way (another publisher, by hand)
        with redis.Redis.from_url(redis_broker.split("?")[0]) as client:
            client.xadd(bus.key(1), {"e": "e", "s": "3", "k": "delta",
                                     "m": redis_bus._encode(message(1, "e", 3, v1=3))})
        await bus.publish(message(1, "e", 4, v1=4))
        got = await bus.since(1, "e", 0)
        assert got is not None and [m.seq for m in got] == [1, 2, 3, 4]
        assert [m.seq for m in await bus.since(1, "e", 2) or []] == [3, 4]
        assert await bus.since(1, "e", 4) == []
        assert await bus.since(1, "e", 5) is None
        assert await bus.since(1, "other", 2) is None
    finally:
        await bus.close()


# -- Redis on its own --------------------------------------------------------------------------

def _redis_sockets() -> int:
    connections = psutil.Process().net_connections(kind="tcp")
    return sum(1 for c in connections if c.raddr and c.raddr.port == 6379)


async def test_one_reader_fans_out_to_every_subscription(redis_broker: str) -> None:
    bus = RedisBus(redis_broker)
    sockets = _redis_sockets()
    try:
        subs = {ws: [bus.subscribe(ws, 100) for _ in range(3)] for ws in (1, 2, 3)}
        for seq in range(1, 6):
            for ws in (3, 1, 2):
                await bus.publish(message(ws, "e", seq, v1=seq * ws))
        for ws, group in subs.items():
            for sub in group:
                got = await drain(bus, sub)
                assert [(m.workspace_id, m.seq, m.counts[(1, None, None)])  # type: ignore[union-attr]
                        for m in got] == [(ws, s, s * ws) for s in range(1, 6)]
        # nine subscriptions, three workspaces: the reader's connection and one to publish
        assert _redis_sockets() - sockets <= 2
        for sub in subs[2]:
            sub.close()
        await bus.publish(message(2, "e", 6))
        await bus.publish(message(1, "e", 6))
        assert [m.seq for m in await drain(bus, subs[1][0])] == [6]  # type: ignore[union-attr]
        assert bus.subscriber_count() == 6
    finally:
        await bus.close()
    assert all(sub.closed for group in subs.values() for sub in group)


async def test_a_new_subscription_gets_what_is_published_right_after(redis_broker: str) -> None:
    """``subscribe`` is synchronous; the reader adds the stream at once (CLIENT UNBLOCK) and
    starts it from the instant of the subscription, so nothing published after is missed."""
    bus = RedisBus(redis_broker)
    try:
        bus.subscribe(1, 10)
        await bus.sync()
        for ws in range(2, 12):
            sub = bus.subscribe(ws, 10)
            await bus.publish(message(ws, "e", 1))  # no wait between
            started = time.perf_counter()
            got = await asyncio.wait_for(anext(sub), 5)
            assert (got.workspace_id, got.seq) == (ws, 1)
            assert time.perf_counter() - started < bus.block_ms / 1000 / 2  # not the timeout
    finally:
        await bus.close()


@pytest.fixture
def short_stream(request: pytest.FixtureRequest) -> Iterator[str]:
    """A URL whose streams are capped at 10 messages."""
    url = scratch_url(request.config, stream_maxlen=10)
    yield url
    delete_prefix(prefix_of(url))


async def test_maxlen_trims_and_since_then_returns_none(short_stream: str) -> None:
    bus, memory = RedisBus(short_stream), MemoryBus(ring_size=10)
    try:
        for seq in range(1, 501):
            await bus.publish(message(1, "e", seq))
            await memory.publish(message(1, "e", seq))
        with redis.Redis.from_url(short_stream.split("?")[0]) as client:
            length = client.xlen(bus.key(1))
        assert 10 <= length < 250  # "MAXLEN ~": whole nodes are trimmed
        for seq in (0, 1, 100, 250):
            assert await bus.since(1, "e", seq) is None
        for seq in (490, 495, 499, 500):
            assert await bus.since(1, "e", seq) == await memory.since(1, "e", seq)
    finally:
        await bus.close()
        await memory.close()


async def test_the_reader_survives_client_kill(redis_broker: str) -> None:
    bus = RedisBus(redis_broker)
    try:
        sub = bus.subscribe(1, 100)
        await bus.publish(message(1, "e", 1))
        assert [m.seq for m in await drain(bus, sub)] == [1]  # type: ignore[union-attr]
        for round_ in range(3):
            reader_id = bus._reader_id
            assert reader_id is not None
            with redis.Redis.from_url(redis_broker.split("?")[0]) as client:
                assert client.client_kill_filter(_id=reader_id) == 1
            await bus.publish(message(1, "e", 2 + round_))
            got = await asyncio.wait_for(anext(sub), 10)
            assert got.seq == 2 + round_  # nothing was lost, so no Overflow
            assert bus._reader_id != reader_id
        assert bus.errors >= 3
        assert bus.overflows == 0
    finally:
        await bus.close()


async def test_a_reader_that_lost_messages_overflows_its_subscriptions(
        short_stream: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The reader's connection dies and, before it is back, the stream is trimmed past its
    position: its subscriptions get Overflow (their hubs resync), then messages again."""
    monkeypatch.setattr(redis_bus, "BACKOFF", (0.5, 2.0))
    bus = RedisBus(short_stream)
    try:
        sub = bus.subscribe(1, 1000)
        other = bus.subscribe(2, 1000)
        await bus.publish(message(1, "e", 1))
        await bus.publish(message(2, "e", 1))
        assert len(await drain(bus, sub)) == len(await drain(bus, other)) == 1
        with redis.Redis.from_url(short_stream.split("?")[0]) as client:
            client.client_kill_filter(_id=bus._reader_id)
            with client.pipeline(transaction=False) as pipe:
                for seq in range(2, 400):
                    pipe.xadd(bus.key(1), {"e": "e", "s": str(seq), "k": "delta",
                                           "m": redis_bus._encode(message(1, "e", seq))},
                              maxlen=10, approximate=True)
                pipe.execute()
        with pytest.raises(Overflow):
            await asyncio.wait_for(anext(sub), 10)
        await bus.publish(message(1, "e", 400))
        assert (await asyncio.wait_for(anext(sub), 10)).seq == 400
        await bus.publish(message(2, "e", 2))
        assert [m.seq for m in await drain(bus, other)] == [2]  # type: ignore[union-attr]
    finally:
        await bus.close()


async def test_lost_data_does_not_stop_the_reader(redis_broker: str) -> None:
    """FLUSHDB (or a restart without persistence) under a running reader: the streams are
    gone; what the next incarnation publishes is delivered."""
    bus = RedisBus(redis_broker)
    try:
        sub = bus.subscribe(1, 100)
        await bus.publish(message(1, "old", 1))
        assert len(await drain(bus, sub)) == 1
        assert lose_data(redis_broker) > 0
        assert await bus.since(1, "old", 0) is None
        await bus.publish(message(1, "new", 1, "views"))
        got = await asyncio.wait_for(anext(sub), 5)
        assert (got.epoch, got.seq, got.kind) == ("new", 1, "views")
        assert got.views == message(1, "new", 1, "views").views
    finally:
        await bus.close()


async def test_close_ends_subscriptions_tasks_and_connections(redis_broker: str) -> None:
    bus = open_bus(redis_broker)
    assert isinstance(bus, RedisBus)
    sub = bus.subscribe(1, 10)
    waiting = asyncio.create_task(anext(sub))
    await bus.sync()
    await bus.close()
    with pytest.raises(StopAsyncIteration):
        await waiting
    assert bus.subscribe(1, 10).closed  # a closed bus starts nothing again
    # (the leak guard checks that no task, thread or socket is left)


async def test_an_unreachable_redis_is_unavailable_and_the_reader_waits() -> None:
    bus = RedisBus("redis://127.0.0.1:1/0?socket_connect_timeout=0.5")
    try:
        with pytest.raises(Unavailable):
            await bus.publish(message(1, "e", 1))
        with pytest.raises(Unavailable):
            await bus.since(1, "e", 0)
        bus.subscribe(1, 10)
        for _ in range(100):
            if bus.errors:
                break
            await asyncio.sleep(0.01)
        assert bus.errors > 0  # it failed, logged, and keeps retrying until closed
    finally:
        await bus.close()
