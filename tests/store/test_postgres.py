"""What the PostgreSQL store adds to the shared contract (which the other test files run on
both backends): connection settings, outbox commit order across processes, LISTEN/NOTIFY
wake-ups, concurrent writers on the same rows, locks held elsewhere, and connections the
server terminates.

Several store instances on one database stand for several processes (gateways, workers):
each has its own pool, writer thread and listener, exactly as a process would.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import random
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import psycopg
import pytest
from sqlalchemy.engine import Connection

from livecount.domain import Image
from livecount.exceptions import Unavailable, ValidationError
from livecount.store import open_store
from livecount.store.base import OutboxEntry, View, relay_lane, written_position
from livecount.store.postgres import OUTBOX_CHANNEL, POOL_SIZE, PostgresStore
from livecount.store.raw import RawTx
from livecount.store.sqlstore import MAX_OUTBOX_BATCH

from .conftest import dump, reset_postgres

pytestmark = [pytest.mark.anyio, pytest.mark.postgres]

OPEN = {"field": "state", "operator": "=", "value": "open"}


@pytest.fixture
def pg_url(pg_database: str) -> str:
    """This session's database, emptied; no query string (tests add their own)."""
    reset_postgres(pg_database)
    return pg_database


def named(url: str, application_name: str | None = None, **params: str) -> str:
    """``url`` whose connections carry ``application_name`` (a fresh unique one by default),
    so a test can find, and terminate, exactly the store's connections."""
    query = {"application_name": application_name or f"lc_{uuid.uuid4().hex[:12]}", **params}
    return url + "?" + "&".join(f"{k}={v}" for k, v in query.items())


def app_name(url: str) -> str:
    return url.rpartition("application_name=")[2].split("&")[0]


@contextlib.asynccontextmanager
async def opened(url: str) -> AsyncIterator[PostgresStore]:
    store = open_store(url)
    assert isinstance(store, PostgresStore)
    await store.open()
    try:
        yield store
    finally:
        await store.close()


@contextlib.contextmanager
def admin(url: str) -> Iterator[psycopg.Connection[Any]]:
    """A connection of the test's own (another session, as an operator's ``psql``)."""
    with psycopg.connect(url.partition("?")[0], autocommit=True, connect_timeout=5) as conn:
        yield conn


def terminate(url: str, application_name: str, query_like: str = "%") -> int:
    """``pg_terminate_backend`` every backend of ``application_name`` (whose current or last
    query is like ``query_like``); waits until they are gone. Returns how many there were."""
    with admin(url) as conn:
        rows = conn.execute(
            "SELECT pg_terminate_backend(pid, 5000) FROM pg_stat_activity "
            "WHERE application_name = %s AND query LIKE %s AND pid <> pg_backend_pid()",
            (application_name, query_like)).fetchall()
    assert all(ok for (ok,) in rows)
    return len(rows)


def backends(url: str, application_name: str) -> int:
    with admin(url) as conn:
        row = conn.execute("SELECT COUNT(*) FROM pg_stat_activity WHERE application_name = %s",
                           (application_name,)).fetchone()
    assert row is not None
    return int(row[0])


async def until(condition: Callable[[], bool], within: float = 10.0) -> None:
    deadline = time.monotonic() + within
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.005)


def store_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("livecount-store")]


# -- connections --------------------------------------------------------------------------------


async def test_connections_are_configured(pg_url: str) -> None:
    url = named(pg_url)

    def settings(conn: Connection) -> tuple[Any, ...]:
        return tuple(conn.exec_driver_sql(f"SHOW {name}").scalar() for name in (
            "transaction_isolation", "jit", "lock_timeout", "application_name"))

    async with opened(url) as store:
        assert await store._read(settings) == ("repeatable read", "off", "5s", app_name(url))
        assert await store._write(settings) == ("read committed", "off", "5s", app_name(url))
        with relay_lane():
            assert (await store._read(settings))[0] == "repeatable read"
        engine = store._engine
        assert engine is not None
        assert engine.pool.size() == POOL_SIZE == 4  # type: ignore[attr-defined]
        assert engine.pool._max_overflow == 0  # type: ignore[attr-defined]
        assert engine.pool._pre_ping  # type: ignore[attr-defined]
        # busy enough to open every pooled connection, and never more
        workspace = await store.create_workspace("w")
        await asyncio.gather(*(store.list_views(workspace.id) for _ in range(50)),
                             *(store.create_conversation(workspace.id, {}, None)
                               for _ in range(20)))
        with relay_lane():
            await store.outbox_position()
        assert backends(pg_url, app_name(url)) <= POOL_SIZE
        assert store_threads().count("livecount-store-listen") == 0  # nobody listens yet
    await until(lambda: backends(pg_url, app_name(url)) == 0)  # the server ends them at once


async def test_the_urls_options_are_kept_and_win(pg_url: str) -> None:
    url = named(pg_url, options="-c%20lock_timeout%3D250ms%20-c%20work_mem%3D8MB")

    def settings(conn: Connection) -> tuple[Any, ...]:
        return tuple(conn.exec_driver_sql(f"SHOW {name}").scalar()
                     for name in ("lock_timeout", "work_mem", "jit"))

    async with opened(url) as store:
        assert await store._read(settings) == ("250ms", "8MB", "off")


async def test_an_unreachable_server_is_a_503_and_leaves_nothing_behind() -> None:
    before = threading.active_count()
    store = open_store("postgresql://postgres@127.0.0.1:1/nowhere?connect_timeout=2")
    with pytest.raises(Unavailable, match="unavailable"):
        await store.open()
    assert threading.active_count() == before
    await store.close()


async def test_ids_and_positions_come_from_sequences(pg_url: str) -> None:
    """Conversation ids are the sequence's (not MAX + 1): a rolled-back create uses one up,
    and a second "process" never hands out the same id."""
    async with opened(named(pg_url)) as one, opened(named(pg_url)) as two:
        workspace = await one.create_workspace("w")
        a = await one.create_conversation(workspace.id, {}, None)
        with pytest.raises(ValidationError):
            await one.create_conversation(workspace.id, {"assignee_id": 999}, None)
        b = await two.create_conversation(workspace.id, {}, None)
        made = await asyncio.gather(*(s.create_conversation(workspace.id, {}, None)
                                      for s in (one, two) for _ in range(20)))
        ids = [a.id, b.id, *(m.id for m in made)]
        assert len(set(ids)) == len(ids)
        assert b.id > a.id + 1  # the refused create took a.id + 1


# -- outbox commit order across processes ------------------------------------------------------


@pytest.mark.parametrize("serialize", [True, False], ids=["locked", "unlocked"])
async def test_a_reader_never_skips_an_entry_still_in_flight(
        pg_url: str, monkeypatch: pytest.MonkeyPatch, serialize: bool) -> None:
    """The classic outbox hazard, made deterministic: process A has inserted its outbox row
    (position p+1) but not committed; process B appends (p+2). With the advisory lock B
    waits for A, so a reader never sees p+2 before p+1. Without it (``unlocked``: what the
    lock prevents) B commits p+2 first, a reader moves past it, and p+1 is skipped forever."""
    async with opened(named(pg_url)) as a, opened(named(pg_url)) as b, \
            opened(named(pg_url)) as reader:
        a.serialize_appends = b.serialize_appends = serialize
        workspace = await a.create_workspace("w")
        start = await reader.outbox_position()
        inserted, release = threading.Event(), threading.Event()
        real = a._flush_appends  # a group commit's appends: inserted right before COMMIT

        def paused(tx: RawTx, results: Any) -> Any:
            flushed = real(tx, results)
            inserted.set()
            assert release.wait(10)
            return flushed

        monkeypatch.setattr(a, "_flush_appends", paused)
        first = asyncio.ensure_future(a.create_conversation(workspace.id, {}, None))
        try:
            await until(inserted.is_set)
            second = asyncio.ensure_future(b.create_conversation(workspace.id, {}, None))
            await asyncio.sleep(0.3)
            seen = await reader.read_outbox(start, 100)
            if serialize:
                assert not second.done()  # B waits for A's lock
                assert seen == []
            else:
                await second
                assert [e.position for e in seen] == [start + 2]  # p+1 not visible yet
        finally:
            release.set()
            made_a, made_b = await asyncio.gather(first, second)
        after = seen[-1].position if seen else start  # where a polling reader goes on from
        rest = await reader.read_outbox(after, 100)
        everything = await reader.read_outbox(start, 100)
        assert [(e.position, e.entity_id) for e in everything] == [
            (start + 1, made_a.id), (start + 2, made_b.id)]
        read = [e.position for e in seen + rest]
        if serialize:
            assert read == [start + 1, start + 2]
        else:
            assert read == [start + 2]  # start + 1 was skipped, for good


async def poll_outbox(store: PostgresStore, stop: asyncio.Event) -> list[OutboxEntry]:
    """A relay's loop: read after the last position seen, in small batches, as fast as it
    can, until ``stop`` is set and nothing more comes."""
    seen: list[OutboxEntry] = []
    position = 0
    while True:
        stopping = stop.is_set()
        with relay_lane():
            batch = await store.read_outbox(position, 7)
        seen += batch
        if batch:
            position = batch[-1].position
        elif stopping:
            return seen
        else:
            await asyncio.sleep(0)


async def test_concurrent_writers_and_a_polling_reader_see_every_position_once_in_order(
        pg_url: str) -> None:
    """Four "processes" write at once — creates, patches of shared conversations, views —
    while a fifth polls the outbox: it sees every position exactly once, in order, and each
    entity's versions in sequence with each entry's before equal to the previous after."""
    writers = [open_store(named(pg_url)) for _ in range(4)]
    reader = open_store(named(pg_url))
    stores: list[Any] = [*writers, reader]
    for store in stores:
        await store.open()
    try:
        workspace = await writers[0].create_workspace("w")
        shared = [await writers[0].create_conversation(workspace.id, {}, None)
                  for _ in range(4)]
        stop = asyncio.Event()
        polling = asyncio.ensure_future(poll_outbox(reader, stop))
        rng = random.Random(5)
        returned: list[tuple[int, Image | View]] = []

        async def write(store: PostgresStore, i: int) -> None:
            kind = rng.random()
            result: Image | View
            if kind < 0.3:
                result = await store.create_conversation(
                    workspace.id, {"tags": [f"t{i}"], "custom": {"i": i}}, None)
            elif kind < 0.9:  # every patch changes something: each one appends
                result = await store.update_conversation(
                    workspace.id, rng.choice(shared).id,
                    {"tags": [f"t{i}", "x"], "custom": {f"k{i % 5}": f"{id(store)}.{i}"},
                     "state": rng.choice(["open", "closed"])}, None)
            else:
                result = await store.create_view(workspace.id, f"v{i}", OPEN, None, None)
            returned.append((written_position.get(), result))

        async def work(store: PostgresStore, n: int) -> None:
            for i in range(n):
                await write(store, i)

        try:
            await asyncio.gather(*(work(store, 60) for store in writers))
        finally:
            stop.set()
            seen = await polling
        everything = await reader.read_outbox(0, MAX_OUTBOX_BATCH)
    finally:
        for store in stores:
            await store.close()
    positions = [e.position for e in seen]
    assert positions == [e.position for e in everything]  # none skipped, none twice
    assert positions == sorted(set(positions))
    assert len(returned) == 240
    logged = {e.position: e for e in everything}
    for position, result in returned:
        assert logged[position].after == result
        assert logged[position].entity_id == result.id
    last: dict[tuple[str, int], OutboxEntry] = {}
    for entry in everything:
        key = (entry.kind, entry.entity_id)
        previous = last.get(key)
        assert entry.version == (previous.version + 1 if previous else 1)
        assert entry.before == (previous.after if previous else None)
        last[key] = entry


async def test_concurrent_patches_from_two_processes_lose_nothing(pg_url: str) -> None:
    """Two stores patch the same conversation (custom keys merge, tags replace): none is
    lost, no version repeats, and every logged before-image is exactly the row as it was —
    each write locks the row before reading it (READ COMMITTED would otherwise let it read the
    side tables and the row in different snapshots)."""
    async with opened(named(pg_url)) as one, opened(named(pg_url)) as two:
        workspace = await one.create_workspace("w")
        image = await one.create_conversation(workspace.id, {}, None)
        start = await one.outbox_position()
        await asyncio.gather(*(
            store.update_conversation(workspace.id, image.id,
                                      {"custom": {f"{name}{i}": i}, "tags": [f"{name}{i}"]},
                                      None)
            for i in range(25) for name, store in (("a", one), ("b", two))))
        final = await two.get_conversation(workspace.id, image.id)
        entries = await one.read_outbox(start, MAX_OUTBOX_BATCH)
    assert final.version == 51
    assert final.custom == {f"{n}{i}": i for i in range(25) for n in "ab"}
    assert [e.version for e in entries] == list(range(2, 52))
    for previous, entry in itertools.pairwise(entries):
        assert entry.before == previous.after
    assert entries[-1].after == final


async def test_concurrent_view_creations_take_distinct_positions(pg_url: str) -> None:
    async with opened(named(pg_url)) as one, opened(named(pg_url)) as two:
        workspace = await one.create_workspace("w")
        made = await asyncio.gather(*(store.create_view(workspace.id, f"v{i}", OPEN, None, None)
                                      for i in range(15) for store in (one, two)))
        positions = [view.position for view in made]
        assert sorted(positions) == list(range(7, 37))


async def test_reopens_lock_their_rows_before_the_outbox(pg_url: str) -> None:
    """A reopen batch (several rows, several appends, one transaction) racing a patch from
    another process on one of its rows: neither deadlocks, the patch wins or loses cleanly."""
    async with opened(named(pg_url)) as relay, opened(named(pg_url)) as api:
        workspace = await relay.create_workspace("w")
        snoozed = [await relay.create_conversation(
            workspace.id, {"state": "snoozed", "snoozed_until": "2020-01-01T00:00:00Z"}, None)
            for _ in range(30)]
        due = [(workspace.id, c.id, c.version) for c in snoozed]
        reopened, *patched = await asyncio.gather(
            relay.reopen_conversations(due),
            *(api.update_conversation(workspace.id, c.id, {"priority": True}, None)
              for c in reversed(snoozed)))
        # no deadlock (PostgreSQL would have broken it by failing one side: a 503)
        for conversation, done, patch in zip(snoozed, reopened, reversed(patched),
                                             strict=True):
            now = await relay.get_conversation(workspace.id, conversation.id)
            assert now.priority
            assert (now.state == "open") == done
            assert now.version == 2 + done
            assert patch.version in (2, 3)


# -- notifications ------------------------------------------------------------------------------


async def test_a_commit_in_another_process_wakes_on_commit(pg_url: str) -> None:
    async with opened(named(pg_url)) as me, opened(named(pg_url)) as other:
        workspace = await other.create_workspace("w")
        calls: list[str] = []
        unsubscribe = me.on_commit(lambda: calls.append(threading.current_thread().name))
        await until(me.listening)
        await other.create_conversation(workspace.id, {}, None)
        await until(lambda: len(calls) == 1)
        assert calls == ["livecount-store-listen"]
        # a write that appends nothing notifies nobody; my own commits wake me once, from
        # my writer (the listener skips the notifications I sent)
        await other.create_teammate(workspace.id, "a", "a@x")
        await me.create_conversation(workspace.id, {}, None)
        await asyncio.sleep(0.3)
        assert calls[0] == "livecount-store-listen" and len(calls) == 2
        assert calls[1].startswith("livecount-store-write")
        # one transaction, seven appends: one notification
        await other.create_workspace("x")
        await until(lambda: len(calls) == 3)
        await asyncio.sleep(0.2)
        assert len(calls) == 3
        unsubscribe()
        await other.create_conversation(workspace.id, {}, None)
        await asyncio.sleep(0.2)
        assert len(calls) == 3


async def test_a_notification_wakes_an_event_loop_in_the_other_process(pg_url: str) -> None:
    """The relay's pattern: hop back to the loop with call_soon_threadsafe."""
    async with opened(named(pg_url)) as relay, opened(named(pg_url)) as gateway:
        workspace = await gateway.create_workspace("w")
        loop = asyncio.get_running_loop()
        woken = asyncio.Event()
        relay.on_commit(lambda: loop.call_soon_threadsafe(woken.set))
        await until(relay.listening)
        started = time.monotonic()
        await gateway.create_conversation(workspace.id, {}, None)
        await asyncio.wait_for(woken.wait(), 5)
        assert time.monotonic() - started < 2.0  # pushed, not polled (~10 ms when idle)


async def test_a_lost_notification_is_made_good_when_the_listener_reconnects(
        pg_url: str) -> None:
    """The listener's connection is terminated (notifications sent meanwhile are lost): it
    reconnects by itself and wakes its subscribers once, so a relay polls what it missed."""
    url = named(pg_url)
    async with opened(url) as me, opened(named(pg_url)) as other:
        workspace = await other.create_workspace("w")
        calls: list[int] = []
        me.on_commit(lambda: calls.append(1))
        await until(me.listening)
        assert terminate(pg_url, app_name(url), f"LISTEN {OUTBOX_CHANNEL}") == 1
        await other.create_conversation(workspace.id, {}, None)  # maybe lost
        await until(lambda: len(calls) >= 1)  # the reconnect's wake-up, at least
        await until(me.listening)
        await asyncio.sleep(0.2)  # the first write's notification, if it was not lost
        count = len(calls)
        await other.create_conversation(workspace.id, {}, None)
        await until(lambda: len(calls) == count + 1)


async def test_close_stops_the_listener_at_once(pg_url: str) -> None:
    url = named(pg_url)
    store = open_store(url)
    await store.open()
    store.on_commit(lambda: None)
    await until(store.listening)  # type: ignore[attr-defined]
    assert "livecount-store-listen" in store_threads()
    started = time.monotonic()
    await store.close()
    assert time.monotonic() - started < 2.0  # no timeout to wait out (~10 ms when idle)
    assert store_threads() == []
    await until(lambda: backends(pg_url, app_name(url)) == 0)


async def test_subscribing_before_open_listens_from_the_start(pg_url: str) -> None:
    url = named(pg_url)
    store = open_store(url)
    assert isinstance(store, PostgresStore)
    calls: list[int] = []
    store.on_commit(lambda: calls.append(1))
    assert store_threads() == []
    await store.open()
    try:
        await until(store.listening)
        async with opened(named(pg_url)) as other:
            await other.create_workspace("w")
        await until(lambda: len(calls) == 1)
    finally:
        await store.close()


# -- locks held elsewhere and terminated connections --------------------------------------------


async def test_a_lock_held_elsewhere_is_a_503_then_recovers(pg_url: str) -> None:
    """Another session holds the outbox's write lock: a write gives up after lock_timeout
    (here 100 ms) with the 503 "busy" answer, reads go on, and once the lock is gone writes
    do too."""
    url = named(pg_url, options="-c%20lock_timeout%3D100")
    async with opened(url) as store:
        before = await store.list_workspaces()
        with admin(pg_url) as other:
            other.execute("BEGIN")
            other.execute("LOCK TABLE outbox IN EXCLUSIVE MODE")
            started = time.monotonic()
            with pytest.raises(Unavailable) as caught:
                await store.create_workspace("blocked")
            waited = time.monotonic() - started
            assert await store.list_workspaces() == before
            other.execute("ROLLBACK")
        assert caught.value.message == "the database is busy (locked); retry shortly"
        assert 0.09 <= waited < 3
        created = await store.create_workspace("free again")
        assert await store.list_workspaces() == [*before, created]


async def test_terminated_connections_are_replaced_or_a_503_never_a_wedge(pg_url: str) -> None:
    """An operator (or a failover) ends every connection of the store between calls: the
    pool's ping replaces them, so later calls work; none waits beyond its timeout."""
    url = named(pg_url)
    async with opened(url) as store:
        workspace = await store.create_workspace("w")
        await asyncio.gather(*(store.list_views(workspace.id) for _ in range(20)),
                             store.create_conversation(workspace.id, {}, None))
        with relay_lane():
            await store.outbox_position()
        assert terminate(pg_url, app_name(url)) >= 3
        outcomes = []
        for i in range(12):
            call = (store.create_conversation(workspace.id, {}, None) if i % 3 == 0
                    else store.snapshot(workspace.id) if i % 3 == 1
                    else store.read_outbox(0, 10))
            with relay_lane(i % 2 == 0):
                try:
                    await asyncio.wait_for(call, 10)
                    outcomes.append("ok")
                except Unavailable:
                    outcomes.append("503")
        assert outcomes[-6:] == ["ok"] * 6, outcomes
        assert len((await store.snapshot(workspace.id)).conversations) == 1 + outcomes[::3].count(
            "ok")


async def test_a_connection_terminated_mid_transaction_fails_that_call_only(
        pg_url: str) -> None:
    url = named(pg_url)
    async with opened(url) as store:
        workspace = await store.create_workspace("w")
        before = await dump(store)
        inside, resume = threading.Event(), threading.Event()

        def slow_write(conn: Connection) -> None:
            conn.exec_driver_sql(f"INSERT INTO teams (workspace_id, name) VALUES "
                                 f"({workspace.id}, 'half')")
            inside.set()
            assert resume.wait(10)
            conn.exec_driver_sql("SELECT 1")

        for lane, run in ((False, store._write), (True, store._read)):
            inside.clear()
            resume.clear()
            with relay_lane(lane):
                call = asyncio.ensure_future(run(slow_write))
            await until(inside.is_set)
            terminate(pg_url, app_name(url), "INSERT INTO teams%")
            resume.set()
            with pytest.raises(Unavailable, match=r"connection was lost|unavailable"):
                await asyncio.wait_for(call, 10)
        assert await dump(store) == before  # nothing half-written
        await store.create_conversation(workspace.id, {}, None)  # and it goes on
        assert len((await store.snapshot(workspace.id)).conversations) == 1
