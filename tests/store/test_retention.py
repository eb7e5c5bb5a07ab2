"""Outbox retention (DESIGN §5 "Retention") and poison entries (DESIGN §6, guarantee 3).

Pruning deletes applied entries older than a cutoff, in chunks, never the newest one, so
positions never go backwards or get reused; disk use stays flat under a constant write rate.
A row that cannot be decoded comes back from ``read_outbox`` as an entry with ``error`` set
instead of failing the whole batch. On every backend, except what is about SQLite's file.
"""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Connection

from livecount.domain import Image, now_us
from livecount.exceptions import ValidationError
from livecount.store import open_store
from livecount.store.base import OutboxEntry
from livecount.store.schema import outbox
from livecount.store.sqlite import SQLiteStore
from livecount.store.sqlstore import MAX_OUTBOX_BATCH, MAX_POISON_ERROR, PRUNE_CHUNK, SQLStore

from .conftest import World, sqlite_only

pytestmark = pytest.mark.anyio

FOREVER = 2**62  # an age cutoff every entry is older than


async def entries_since(store: SQLStore, position: int) -> list[OutboxEntry]:
    return await store.read_outbox(position, MAX_OUTBOX_BATCH)


async def positions(store: SQLStore) -> list[int]:
    return [entry.position for entry in await entries_since(store, 0)]


async def touch(store: SQLStore, world: World, times: int) -> list[Image]:
    """``times`` conversation writes in the home workspace; one outbox entry each."""
    return [await store.create_conversation(world.home.id, {}, None) for _ in range(times)]


def db_path(store: SQLStore) -> Path:
    database = sa.make_url(store.url).database
    assert database
    return Path(database)


def disk_bytes(path: Path) -> int:
    """The database file plus its write-ahead log (the shared-memory index is not data)."""
    wal = path.with_name(path.name + "-wal")
    return path.stat().st_size + (wal.stat().st_size if wal.exists() else 0)


# -- positions never go backwards --------------------------------------------------------------


async def test_prune_keeps_positions_monotonic(store: SQLStore, world: World) -> None:
    await touch(store, world, 5)
    before = await positions(store)
    newest = await store.outbox_position()
    assert before[-1] == newest

    pruned = await store.prune_outbox(newest, FOREVER)
    # everything applied went, except the newest entry, which holds the position
    assert pruned == len(before) - 1
    assert await positions(store) == [newest]
    assert await store.outbox_position() == newest
    assert await store.prune_outbox(newest, FOREVER) == 0  # idempotent

    [created] = await touch(store, world, 1)
    [entry] = await entries_since(store, newest)
    assert entry.position == newest + 1 > max(before)
    assert entry.after == created
    assert await store.outbox_position() == newest + 1


async def test_positions_survive_a_prune_and_a_restart(db_url: str) -> None:
    store = open_store(db_url)
    await store.open()
    try:
        workspace = await store.create_workspace("w")
        newest = await store.outbox_position()
        await store.prune_outbox(newest, FOREVER)
    finally:
        await store.close()
    store = open_store(db_url)
    await store.open()
    try:
        assert await store.outbox_position() == newest
        await store.create_conversation(workspace.id, {}, None)
        assert await store.outbox_position() == newest + 1
    finally:
        await store.close()


@sqlite_only
async def test_an_outbox_without_autoincrement_never_reuses_positions(db_url: str) -> None:
    """A database file whose outbox predates AUTOINCREMENT (a plain INTEGER PRIMARY KEY, which
    SQLite hands out as MAX(id) + 1) keeps working: the newest row survives every prune."""
    store = SQLiteStore(db_url)
    await store.open()
    await store.close()
    path = db_path(store)
    plain = sqlite3.connect(path)
    try:
        (ddl,) = plain.execute("SELECT sql FROM sqlite_master WHERE name = 'outbox'").fetchone()
        assert "AUTOINCREMENT" in ddl
        plain.execute("DROP TABLE outbox")
        plain.execute(ddl.replace("AUTOINCREMENT", ""))
        plain.commit()
    finally:
        plain.close()
    store = SQLiteStore(db_url)
    await store.open()
    try:
        workspace = await store.create_workspace("w")
        seen = await positions(store)
        for _ in range(3):
            newest = await store.outbox_position()
            await store.prune_outbox(newest, FOREVER)
            assert await store.outbox_position() == newest
            await store.create_conversation(workspace.id, {}, None)
            [entry] = await entries_since(store, newest)
            assert entry.position == newest + 1 > max(seen)
            seen.append(entry.position)
    finally:
        await store.close()


# -- what is pruned ---------------------------------------------------------------------------


async def test_prune_respects_applied_and_the_age_cutoff(
    store: SQLStore, world: World
) -> None:
    await touch(store, world, 10)
    old = await positions(store)
    cutoff = (await entries_since(store, 0))[-1].committed_at + 1  # after every old entry
    await asyncio.sleep(0.002)
    assert now_us() > cutoff  # so every later entry is committed at or after it
    await touch(store, world, 10)
    everything = await positions(store)
    young = everything[len(old):]

    # only what is applied...
    assert await store.prune_outbox(old[4], FOREVER) == 5
    assert await positions(store) == everything[5:]
    # ...and only what is older than the cutoff
    assert await store.prune_outbox(everything[-1], cutoff) == len(old) - 5
    assert await positions(store) == young
    assert await store.prune_outbox(everything[-1], cutoff) == 0
    # nothing applied, nothing older: nothing goes
    assert await store.prune_outbox(0, FOREVER) == 0
    assert await store.prune_outbox(everything[-1], 0) == 0
    assert await positions(store) == young
    # the survivors are intact
    assert [e.after for e in await entries_since(store, 0)] == [
        await store.get_conversation(world.home.id, e.entity_id)
        for e in await entries_since(store, 0)
    ]


async def test_prune_of_an_empty_outbox_and_bad_arguments(store: SQLStore) -> None:
    assert await store.prune_outbox(10, FOREVER) == 0
    assert await store.outbox_position() == 0
    assert await store.outbox_floor() == 0
    for applied, older_than, path in (
        (-1, 0, "applied"),
        ("5", 0, "applied"),
        (True, 0, "applied"),
        (5, -1, "older_than_us"),
        (5, 1.5, "older_than_us"),
    ):
        with pytest.raises(ValidationError) as info:
            await store.prune_outbox(applied, older_than)
        assert info.value.path == path


async def test_a_big_prune_goes_in_chunks_and_lets_writes_through(
    store: SQLStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    total = 5 * PRUNE_CHUNK + 1

    def fill(conn: Connection) -> None:
        conn.execute(outbox.insert(), [
            {"workspace_id": 1, "kind": "conversation", "entity_id": i, "version": 1,
             "before": None, "after": None, "committed_at": 1}
            for i in range(total)
        ])

    await store._write(fill)
    assert await store.outbox_position() == total

    log: list[Any] = []
    chunk = store._prune_chunk

    def spy(conn: Connection, *args: int) -> tuple[int, int]:
        done = chunk(conn, *args)
        log.append(done[0])
        return done

    monkeypatch.setattr(store, "_prune_chunk", spy)

    async def write_meanwhile() -> None:
        await store.set_setting_if_absent("k", "v")
        log.append("write")

    pruned, _ = await asyncio.gather(store.prune_outbox(total, FOREVER), write_meanwhile())
    assert pruned == total - 1
    counts = [n for n in log if n != "write"]
    assert all(n <= PRUNE_CHUNK for n in counts) and sum(counts) == total - 1
    assert len(counts) >= 5
    assert log.index("write") < len(log) - 1  # not queued behind the whole prune
    assert await positions(store) == [total]
    assert await store.outbox_position() == total
    assert await store.outbox_floor() == total - 1


async def test_outbox_floor_reports_pruned_ranges(store: SQLStore, world: World) -> None:
    assert await store.outbox_floor() == 0  # nothing pruned yet
    await touch(store, world, 5)
    everything = await positions(store)
    assert everything[0] == 1
    assert await store.outbox_floor() == 0

    await store.prune_outbox(everything[3], FOREVER)
    floor = await store.outbox_floor()
    assert floor == everything[3]
    # everything after the floor is there; the entries at or before it are gone
    assert [e.position for e in await entries_since(store, floor)] == everything[4:]
    assert await entries_since(store, 0) == await entries_since(store, floor)

    newest = await store.outbox_position()
    await store.prune_outbox(newest, FOREVER)
    assert await store.outbox_floor() == newest - 1
    await touch(store, world, 1)
    assert await store.outbox_floor() == newest - 1


# -- disk stays flat ---------------------------------------------------------------------------


async def write_rounds(db_url: str, rounds: int, per_round: int, prune: bool) -> list[int]:
    """``rounds`` rounds of ``per_round`` conversation updates at a constant rate; with
    ``prune``, each round ends by pruning everything applied before the round began (a
    retention of one round). Returns the database + WAL size after each round."""
    store = SQLiteStore(db_url)
    await store.open()
    sizes: list[int] = []
    try:
        workspace = await store.create_workspace("w")
        ids = [(await store.create_conversation(workspace.id, {}, None)).id
               for _ in range(100)]
        path = db_path(store)
        n = 0
        for _ in range(rounds):
            began = now_us()
            for _ in range(per_round):
                n += 1
                await store.update_conversation(
                    workspace.id, ids[n % len(ids)], {"custom": {"n": n}, "tags": [f"t{n}"]},
                    None)
            if prune:
                await store.prune_outbox(await store.outbox_position(), began)
            sizes.append(disk_bytes(path))
    finally:
        await store.close()
    return sizes


@pytest.mark.parametrize(
    "rounds, per_round",
    [(12, 500), pytest.param(30, 2000, marks=pytest.mark.slow)],
)
async def test_disk_stays_flat_under_a_constant_write_rate(
    tmp_path: Path, rounds: int, per_round: int
) -> None:
    pruned = await write_rounds(f"sqlite:///{tmp_path / 'pruned.db'}", rounds, per_round, True)
    kept = await write_rounds(f"sqlite:///{tmp_path / 'kept.db'}", rounds, per_round, False)
    print(f"\n{rounds} rounds x {per_round} updates, database + WAL bytes after each round\n"
          f"  pruned: {pruned}\n  not pruned: {kept}")
    # with pruning: after a warm-up (the table holds two rounds at most), the size is flat
    warm = max(pruned[1:3])
    margin = max(warm // 20, 64 * 1024)
    assert max(pruned[-3:]) <= warm + margin, pruned
    # without: it grows with every round, well past that margin
    assert kept[-1] > kept[2] + (rounds - 3) * per_round * 100, kept
    assert kept[-1] > 2 * pruned[-1]


# -- poison entries -----------------------------------------------------------------------------


async def test_undecodable_rows_come_back_as_poison_entries_in_order(
    store: SQLStore, world: World
) -> None:
    start = await store.outbox_position()
    created = await touch(store, world, 6)
    view = await store.create_view(world.home.id, "v", {"field": "state", "operator": "=",
                                                          "value": "open"}, None, None)
    good = await entries_since(store, start)
    assert [e.error for e in good] == [None] * 7
    bad_json, unknown_kind, wrong_shape, bad_view = (good[1].position, good[3].position,
                                                     good[4].position, good[6].position)

    def corrupt(conn: Connection) -> None:
        for position, values in (
            (bad_json, {"after": '{"id": 1, "workspace_id": '}),
            (unknown_kind, {"kind": "bogus"}),
            (wrong_shape, {"before": "[1, 2]", "after": '{"id": "x"}'}),
            (bad_view, {"after": "not json"}),
        ):
            conn.execute(outbox.update().where(outbox.c.id == position).values(**values))

    await store._write(corrupt)
    read = await entries_since(store, start)
    assert [e.position for e in read] == [e.position for e in good]
    for entry, original in zip(read, good, strict=True):
        if entry.position not in (bad_json, unknown_kind, wrong_shape, bad_view):
            assert entry == original
            continue
        assert entry.error, entry
        assert str(entry.position) in entry.error and len(entry.error) < 400
        assert (entry.before, entry.after) == (None, None)
        assert (entry.workspace_id, entry.entity_id, entry.version, entry.committed_at) == (
            original.workspace_id, original.entity_id, original.version,
            original.committed_at)
    by_position = {e.position: e for e in read}
    assert by_position[bad_json].kind == "conversation"
    assert "after" in (by_position[bad_json].error or "")
    assert by_position[unknown_kind].kind == "conversation"
    assert "bogus" in (by_position[unknown_kind].error or "")
    assert "before" in (by_position[wrong_shape].error or "")
    assert by_position[bad_view].kind == "view"
    assert by_position[bad_view].entity_id == view.id
    assert [e.after for e in read if e.error is None] == [*(created[i] for i in (0, 2, 5))]

    # paging over them works too: no batch fails, none is skipped
    paged: list[OutboxEntry] = []
    position = start
    while batch := await store.read_outbox(position, 2):
        paged += batch
        position = batch[-1].position
    assert paged == read


async def test_record_and_list_poison(store: SQLStore, world: World) -> None:
    assert await store.list_poison() == []
    await store.record_poison(7, world.home.id, "after: bad JSON")
    await store.record_poison(3, world.away.id, "unknown kind 'x'")
    await store.record_poison(7, world.home.id, "recorded again")  # idempotent: first wins
    await store.record_poison(9, world.home.id, "x" * (MAX_POISON_ERROR + 50))
    listed = await store.list_poison()
    assert [(p, w) for p, w, _ in listed] == [(3, world.away.id), (7, world.home.id),
                                            (9, world.home.id)]
    assert listed[1][2] == "after: bad JSON"
    assert len(listed[2][2]) == MAX_POISON_ERROR
    assert await store.list_poison(world.home.id) == [listed[1], listed[2]]
    assert await store.list_poison(world.away.id) == [listed[0]]
    assert await store.list_poison(10**6) == []
    # recording touches no log: positions and entries are unchanged
    assert await store.outbox_position() == (await positions(store))[-1]
    for position, workspace, error, path in (
        (0, 1, "e", "position"),
        (-1, 1, "e", "position"),
        ("1", 1, "e", "position"),
        (1, -1, "e", "workspace_id"),
        (1, 1, None, "error"),
    ):
        with pytest.raises(ValidationError) as info:
            await store.record_poison(position, workspace, error)
        assert info.value.path == path
    await store.record_poison(11, 1, "a\x00b\ud800")
    assert (await store.list_poison(1))[-1] == (11, 1, "a\\0b?")
