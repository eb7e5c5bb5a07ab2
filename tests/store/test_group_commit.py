"""Group commit of conversation writes (``SQLStore._group_write``): several queued writes in
one transaction, and still each one alone in what it does and what it is told. The property
at the end compares a group of random writes on the hot path (the bare driver) with the same
writes made one at a time on the SQLAlchemy path the store used before.

Writes are made to land in ONE group by holding the writer thread while they queue up
(:func:`writer_held`); ``groups`` records the size of every group the writer ran, so each test
proves it exercised the path it is about. Every test runs on SQLite and PostgreSQL.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import msgspec
import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from livecount import conversations as convs
from livecount.domain import Image
from livecount.exceptions import (
    Conflict,
    NotFound,
    PreconditionFailed,
    Unavailable,
    ValidationError,
)
from livecount.store import open_store, rows, sqlstore
from livecount.store.base import OutboxEntry, written_position
from livecount.store.raw import RawTx
from livecount.store.sqlstore import MAX_GROUP, MAX_OUTBOX_BATCH, SQLStore

from .conftest import Tenant, World, dump, make_tenant, sqlite_only

pytestmark = pytest.mark.anyio

Outcome = tuple[str, Any, int]  # ("ok", image, position) or ("err", exception, 0)


@contextlib.asynccontextmanager
async def writer_held(store: SQLStore) -> AsyncIterator[None]:
    """Keep the store's writer thread busy for the block: writes queued meanwhile wait, and
    run as one group when it ends."""
    loop = asyncio.get_running_loop()
    entered, release = asyncio.Event(), threading.Event()

    def hold() -> None:
        loop.call_soon_threadsafe(entered.set)
        assert release.wait(10)

    assert store._writer is not None
    held = loop.run_in_executor(store._writer, hold)
    try:
        await entered.wait()
        yield
    finally:
        release.set()
        await held


@pytest.fixture
def groups(store: SQLStore, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The size of every group the writer runs (retries of a group included)."""
    sizes: list[int] = []
    real = store._group_transaction

    def spy(engine: Any, jobs: list[Any]) -> Any:
        sizes.append(len(jobs))
        return real(engine, jobs)

    monkeypatch.setattr(store, "_group_transaction", spy)
    return sizes


async def outcome(call: Awaitable[Image]) -> Outcome:
    """What one write did, as its caller sees it: its image and the position it committed
    at (this task's ``written_position``), or its error."""
    written_position.set(0)  # the task started with its creator's
    try:
        image = await call
    except Exception as exc:
        return ("err", exc, 0)
    return ("ok", image, written_position.get())


async def together(store: SQLStore, calls: list[Callable[[], Awaitable[Image]]]
                   ) -> list[Outcome]:
    """Start every call (in order) while the writer is held: they form one group."""
    async with writer_held(store):
        tasks = [asyncio.ensure_future(outcome(call())) for call in calls]
        await asyncio.sleep(0.01)  # every call has queued its write
    return list(await asyncio.gather(*tasks))


async def entries_since(store: SQLStore, position: int) -> list[OutboxEntry]:
    return await store.read_outbox(position, MAX_OUTBOX_BATCH)


# -- one group, some writes refused ------------------------------------------------------------


async def test_a_group_commits_the_writes_that_pass_and_answers_each_alone(
        store: SQLStore, world: World, groups: list[int]) -> None:
    home, away = world.home, world.away
    ann, bob = home.people
    c1, c2, c3, c4 = [await store.create_conversation(home.id, {}, ann.id) for _ in range(4)]
    foreign = await store.create_conversation(away.id, {}, None)
    start = await store.outbox_position()
    ws = home.id
    calls: list[Callable[[], Awaitable[Image]]] = [
        lambda: store.update_conversation(ws, c1.id, {"state": "closed"}, 1),  # ok: v2
        lambda: store.update_conversation(ws, c2.id, {"priority": True}, 5),  # 412
        lambda: store.update_conversation(ws, 10**12, {"state": "closed"}, None),  # 404
        lambda: store.update_conversation(ws, c3.id, {"assignee_id": away.people[0].id},
                                          None),  # another tenant's teammate: 400
        lambda: store.update_conversation(ws, c1.id, {"tags": ["vip"]}, 2),  # ok: sees #0
        lambda: store.update_conversation(ws, c1.id, {"state": "open"}, 2),  # 412: now v3
        lambda: store.create_conversation(ws, {"tags": ["x"], "assignee_id": bob.id},
                                          ann.id),  # ok
        lambda: store.update_conversation(ws, foreign.id, {"state": "closed"}, None),  # 404
        lambda: store.update_conversation(ws, c4.id, {}, None),  # ok, changes nothing
        lambda: store.update_conversation(ws, c2.id, {"mentions": [bob.id]}, 1),  # ok
    ]
    groups.clear()
    results = await together(store, calls)
    assert groups == [len(calls)]  # one group, no retry: every refusal came before a change

    kinds = [r[0] if r[0] == "ok" else type(r[1]) for r in results]
    assert kinds == ["ok", PreconditionFailed, NotFound, ValidationError, "ok",
                     PreconditionFailed, "ok", NotFound, "ok", "ok"]
    assert results[3][1].path == "assignee_id"
    written = [r for r in results if r[0] == "ok" and r[2]]
    entries = await entries_since(store, start)
    # exactly the writes that changed something, in queue order, at consecutive positions
    assert [e.position for e in entries] == [r[2] for r in written] == list(
        range(start + 1, start + 5))
    assert [e.after for e in entries] == [r[1] for r in written]
    assert entries[1].before == results[0][1]  # the second write of c1 saw the first
    assert (results[4][1].version, results[4][1].state, results[4][1].tags) == (
        3, "closed", frozenset({"vip"}))
    assert results[8] == ("ok", c4, 0)  # nothing changed: no entry, no position
    for conversation in (c1, c2, c3, c4):
        now = await store.get_conversation(ws, conversation.id)
        last = [r[1] for r in written if r[1].id == conversation.id]
        assert now == (last[-1] if last else conversation)
    assert await store.get_conversation(away.id, foreign.id) == foreign


async def test_positions_follow_the_queue_across_several_groups(
        store: SQLStore, world: World, groups: list[int]) -> None:
    home = world.home
    made = [await store.create_conversation(home.id, {}, None) for _ in range(3)]
    start = await store.outbox_position()
    count = MAX_GROUP + 6
    calls = [lambda i=i: store.update_conversation(  # type: ignore[misc]
        home.id, made[i % 3].id, {"custom": {"n": i}}, None) for i in range(count)]
    groups.clear()
    results = await together(store, calls)
    assert groups == [MAX_GROUP, 6]
    assert [r[2] for r in results] == list(range(start + 1, start + count + 1))
    entries = await entries_since(store, start)
    assert [e.after for e in entries] == [r[1] for r in results]
    assert [e.after.custom for e in entries if isinstance(e.after, Image)] == [
        {"n": i} for i in range(count)]


# -- failures that are not a write's own refusal -------------------------------------------------


async def test_a_write_that_breaks_the_transaction_fails_alone_and_the_others_commit(
        store: SQLStore, world: World, groups: list[int],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A bug (or a database error) in the middle of a group, after that write changed its
    row: the whole transaction rolls back, the breaking write gets its error, the others
    run again without it and commit."""
    home = world.home
    made = [await store.create_conversation(home.id, {}, None) for _ in range(5)]
    victim = made[2]
    real = rows.update_image

    def breaks(conn: Any, before: Image, after: Image) -> bool:
        done = real(conn, before, after)
        if before.id == victim.id:
            raise RuntimeError("disk on fire")
        return done

    monkeypatch.setattr(rows, "update_image", breaks)
    start = await store.outbox_position()
    before = await dump(store)
    groups.clear()
    results = await together(store, [
        lambda c=c: store.update_conversation(home.id, c.id, {"priority": True}, None)  # type: ignore[misc]
        for c in made])
    assert groups == [5, 4]  # the group, then the others again without the victim
    assert [r[0] for r in results] == ["ok", "ok", "err", "ok", "ok"]
    assert isinstance(results[2][1], RuntimeError) and "disk on fire" in str(results[2][1])
    assert await store.get_conversation(home.id, victim.id) == victim  # nothing of it
    entries = await entries_since(store, start)
    assert [e.entity_id for e in entries] == [c.id for c in made if c is not victim]
    assert [e.position for e in entries] == [r[2] for r in results if r[0] == "ok"]
    for conversation, result in zip(made, results, strict=True):
        now = await store.get_conversation(home.id, conversation.id)
        assert now.priority is (conversation is not victim)
        assert now == (conversation if conversation is victim else result[1])
    after = await dump(store)
    assert [row for row in after["conversations"] if row[0] == victim.id] == [
        row for row in before["conversations"] if row[0] == victim.id]


async def test_a_refusal_after_a_change_is_undone_with_the_group(
        store: SQLStore, world: World, groups: list[int],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A write refused only after it changed something (here: its outbox append refuses)
    cannot be answered alone — its change would commit with the group. The group is rolled
    back and run again without it."""
    home = world.home
    made = [await store.create_conversation(home.id, {}, None) for _ in range(3)]
    real = store._append_outbox

    def refuses(conn: Any, workspace_id: int, kind: str, entity_id: int, *rest: Any) -> None:
        if entity_id == made[1].id:
            raise Conflict("refused after the update")
        real(conn, workspace_id, kind, entity_id, *rest)  # type: ignore[arg-type]

    monkeypatch.setattr(store, "_append_outbox", refuses)
    start = await store.outbox_position()
    groups.clear()
    results = await together(store, [
        lambda c=c: store.update_conversation(home.id, c.id, {"state": "closed"}, None)  # type: ignore[misc]
        for c in made])
    assert groups == [3, 2]
    assert [r[0] for r in results] == ["ok", "err", "ok"]
    assert isinstance(results[1][1], Conflict)
    assert await store.get_conversation(home.id, made[1].id) == made[1]
    assert [e.entity_id for e in await entries_since(store, start)] == [made[0].id, made[2].id]


def _commit_failure(store: SQLStore) -> Exception:
    """A transient failure of COMMIT as each driver raises it (an I/O error)."""
    assert store._engine is not None
    if store._engine.dialect.name == "sqlite":
        error = sqlite3.OperationalError("disk I/O error")
        error.sqlite_errorcode = 10  # type: ignore[attr-defined]
        return error
    return psycopg.OperationalError("could not write to the WAL")


@pytest.mark.parametrize("step", ["commit", "flush_appends"])
async def test_a_failed_commit_fails_every_write_of_the_group_with_503_and_leaves_nothing(
        store: SQLStore, world: World, groups: list[int],
        monkeypatch: pytest.MonkeyPatch, step: str) -> None:
    """COMMIT fails, or (PostgreSQL) the statement appending the group's deferred outbox
    rows under the outbox lock does (a lock timeout, a dropped connection)."""
    if step == "flush_appends" and not store.defer_appends:
        pytest.skip("this store appends at each write (SQLite: one writer, no shared lock)")
    home = world.home
    made = [await store.create_conversation(home.id, {}, None) for _ in range(3)]
    failure = _commit_failure(store)
    real = getattr(RawTx, step)
    calls_left = [1]

    def failing(tx: RawTx) -> Any:
        if calls_left[0]:
            calls_left[0] -= 1
            raise failure
        return real(tx)

    monkeypatch.setattr(RawTx, step, failing)
    notified: list[int] = []
    store.on_commit(lambda: notified.append(1))
    before = await dump(store)
    writes = [lambda c=c: store.update_conversation(home.id, c.id, {"priority": True}, None)  # type: ignore[misc]
              for c in made]
    writes.append(lambda: store.create_conversation(home.id, {}, None))
    groups.clear()
    results = await together(store, writes)
    assert groups == [4]
    assert all(r[0] == "err" and isinstance(r[1], Unavailable) for r in results), results
    assert all(r[1].status == 503 for r in results)
    assert await dump(store) == before and notified == []
    # and the same writes go through afterwards
    again = await together(store, writes)
    assert [r[0] for r in again] == ["ok"] * 4 and notified == [1]


@sqlite_only
async def test_a_busy_database_fails_the_queued_writes_with_503_then_recovers(
        db_url: str) -> None:
    """Another process holds SQLite's write lock past busy_timeout: BEGIN IMMEDIATE fails,
    every write of the group is told 503 and nothing is written; then they go through."""
    path = db_url.removeprefix("sqlite:///")
    store = open_store(f"{db_url}?busy_timeout_ms=100")
    assert isinstance(store, SQLStore)
    await store.open()
    try:
        tenant: Tenant = await make_tenant(store, "busy")
        made = [await store.create_conversation(tenant.id, {}, None) for _ in range(3)]
        before = await dump(store)
        other = sqlite3.connect(path, isolation_level=None, timeout=5)
        try:
            other.execute("BEGIN EXCLUSIVE")
            results = await asyncio.gather(*(outcome(store.update_conversation(
                tenant.id, c.id, {"state": "closed"}, None)) for c in made))
            other.execute("ROLLBACK")
        finally:
            other.close()
        assert all(r[0] == "err" and isinstance(r[1], Unavailable) for r in results)
        assert {r[1].message for r in results} == {
            "the database is busy (locked); retry shortly"}
        assert await dump(store) == before
        results = await asyncio.gather(*(outcome(store.update_conversation(
            tenant.id, c.id, {"state": "closed"}, None)) for c in made))
        assert [r[0] for r in results] == ["ok"] * 3
    finally:
        await store.close()


async def test_a_write_cancelled_while_queued_is_never_applied(
        store: SQLStore, world: World, groups: list[int]) -> None:
    home = world.home
    made = [await store.create_conversation(home.id, {}, None) for _ in range(3)]
    start = await store.outbox_position()
    groups.clear()
    async with writer_held(store):
        tasks = [asyncio.ensure_future(store.update_conversation(
            home.id, c.id, {"state": "closed"}, None)) for c in made]
        await asyncio.sleep(0.01)
        tasks[1].cancel()
        await asyncio.sleep(0.01)
        # it left the queue at once, not at the next drain: clients that give up while the
        # writer is stuck do not pile up jobs beyond the pending bound
        assert len(store._group) == 2
    done = await asyncio.gather(*tasks, return_exceptions=True)
    assert isinstance(done[1], asyncio.CancelledError)
    assert groups == [2]  # the cancelled one was left out
    assert await store.get_conversation(home.id, made[1].id) == made[1]
    assert [e.entity_id for e in await entries_since(store, start)] == [made[0].id,
                                                                          made[2].id]


async def test_writes_cancelled_while_queued_free_the_queue_and_the_bound(
        store: SQLStore, world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    made = await store.create_conversation(world.home.id, {}, None)
    monkeypatch.setattr(sqlstore, "MAX_PENDING_CALLS", 3)
    async with writer_held(store):
        for round in range(4):  # many more give-ups than the bound while the writer is stuck
            tasks = [asyncio.ensure_future(store.update_conversation(
                world.home.id, made.id, {"custom": {"n": round * 3 + i}}, None))
                for i in range(3)]
            await asyncio.sleep(0.01)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            assert len(store._group) == 0 and not store._pending
        kept = asyncio.ensure_future(store.update_conversation(
            world.home.id, made.id, {"priority": True}, None))
        await asyncio.sleep(0.01)
        assert len(store._group) == 1
    assert (await kept).priority is True
    assert (await store.get_conversation(world.home.id, made.id)).version == 2


async def test_a_drain_that_dies_answers_the_writes_still_queued(
        store: SQLStore, world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    made = await store.create_conversation(world.home.id, {}, None)
    monkeypatch.setattr(sqlstore, "MAX_GROUP", 1)  # one write per group: two stay queued
    writer = store._writer
    assert writer is not None
    submit = writer.submit
    calls = 0

    def submit_once(*args: Any) -> Any:  # the drain's own re-submit fails (not a shutdown)
        nonlocal calls
        calls += 1
        if calls > 1:
            raise ValueError("injected: the writer refuses the next drain")
        return submit(*args)

    async with writer_held(store):
        monkeypatch.setattr(writer, "submit", submit_once)
        tasks = [asyncio.ensure_future(outcome(store.update_conversation(
            world.home.id, made.id, {"custom": {"n": i}}, None))) for i in range(3)]
        await asyncio.sleep(0.01)
    results = await asyncio.wait_for(asyncio.gather(*tasks), 5)  # not stranded
    assert [r[0] for r in results] == ["ok", "err", "err"]
    assert all(isinstance(r[1], Unavailable) for r in results[1:])  # never ran: 503, retry
    monkeypatch.undo()
    assert not store._draining and not store._group
    assert (await store.update_conversation(world.home.id, made.id, {"priority": True},
                                            None)).version == 3


async def test_queued_writes_count_against_the_pending_bound(
        store: SQLStore, world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    made = await store.create_conversation(world.home.id, {}, None)
    monkeypatch.setattr(sqlstore, "MAX_PENDING_CALLS", 3)
    async with writer_held(store):
        tasks = [asyncio.ensure_future(outcome(store.update_conversation(
            world.home.id, made.id, {"custom": {"n": i}}, None))) for i in range(5)]
        await asyncio.sleep(0.01)
    results = await asyncio.gather(*tasks)
    assert [r[0] for r in results] == ["ok"] * 3 + ["err"] * 2
    assert all(isinstance(r[1], Unavailable) for r in results[3:])
    assert (await store.get_conversation(world.home.id, made.id)).custom == {"n": 2}


# -- the property: a group does what the same writes one at a time do -------------------------

_REFS = st.sampled_from(("own0", "own1", "foreign", None))


@st.composite
def _write(draw: st.DrawFn) -> dict[str, Any]:
    """A write, with ids named by role: a conversation by its index among three (or one
    that does not exist, or another tenant's), teammates and teams as this tenant's or the
    other's."""
    body: dict[str, Any] = {}
    for name, value in (("state", st.sampled_from(("open", "closed", "snoozed"))),
                        ("priority", st.booleans()),
                        ("tags", st.lists(st.sampled_from(("a", "b", "vip")), max_size=2)),
                        ("assignee_id", _REFS), ("team_id", _REFS),
                        ("mentions", st.lists(_REFS.filter(bool), max_size=2)),
                        ("custom", st.dictionaries(
                            st.sampled_from(("k", "n")),
                            st.one_of(st.none(), st.integers(0, 3), st.booleans(),
                                      st.sampled_from(("x", "1", 2.5, 1e20))), max_size=2))):
        if draw(st.integers(0, 3)) == 0:
            body[name] = draw(value)
    if draw(st.integers(0, 4)) == 0:
        return {"create": True, "body": body}
    return {"create": False, "body": body,
            "target": draw(st.sampled_from((0, 0, 1, 1, 2, "missing", "foreign"))),
            "if_match": draw(st.sampled_from((None, None, 1, 2, 3)))}


class _Names:
    """One tenant's ids by role, and back (to compare two tenants' results)."""

    def __init__(self, tenant: Tenant, other: Tenant, conversations: list[int],
                 foreign: int) -> None:
        self.tenant = tenant
        self.refs = {"own0": tenant.people[0].id, "own1": tenant.people[1].id,
                     "foreign": other.people[0].id}
        self.teams = {"own0": tenant.team.id, "own1": tenant.team.id,
                      "foreign": other.team.id}
        self.conversations = conversations
        self.foreign = foreign

    def body(self, body: dict[str, Any]) -> dict[str, Any]:
        out = dict(body)
        for name in ("assignee_id", "team_id"):
            if out.get(name) is not None:
                out[name] = (self.teams if name == "team_id" else self.refs)[out[name]]
        if "mentions" in out:
            out["mentions"] = [self.refs[r] for r in out["mentions"]]
        return out

    def target(self, target: int | str) -> int:
        if target == "missing":
            return 10**12
        if target == "foreign":
            return self.foreign
        assert isinstance(target, int)
        return self.conversations[target]

    def image(self, image: Image | None) -> Any:
        """``image`` with this tenant's ids replaced by their roles and times left out."""
        if image is None:
            return None
        people = {v: k for k, v in self.refs.items()}
        people[self.tenant.people[0].id] = "own0"
        ids = {v: i for i, v in enumerate(self.conversations)}
        named = msgspec.structs.replace(
            image, id=ids.get(image.id, -1), workspace_id=0, created_at=0, updated_at=0,
            assignee_id=people.get(image.assignee_id, image.assignee_id),  # type: ignore[arg-type]
            team_id=0 if image.team_id is not None else None,
            author_id=None, mentions=frozenset(people[m] for m in image.mentions))
        # as JSON with sorted keys and sets: true is not 1, 2.0 is not 2
        return msgspec.json.encode(convs.to_wire(named), order="sorted")


async def sqlalchemy_path(store: SQLStore, workspace_id: int, write: dict[str, Any],
                          names: _Names, body: dict[str, Any]) -> Image:
    """The write as the store made it before group commit: validated, then one SQLAlchemy
    Core transaction of its own (``_write``), the same transaction functions."""
    fields = convs.validate_body(body, patch=not write["create"])
    if write["create"]:
        return await store._write(store._create_conversation, workspace_id, fields, None)
    return await store._write(store._update_conversation, workspace_id,
                              names.target(write["target"]), fields, write["if_match"])


async def _tenant_with_conversations(store: SQLStore, name: str, other: Tenant
                                     ) -> tuple[Tenant, list[int]]:
    tenant = await make_tenant(store, name)
    bodies: list[dict[str, Any]] = [
        {},
        {"tags": ["a"], "custom": {"z": 2, "b": True, "f": 2.5, "s": "x"}},
        {"tags": ["a", "b"], "assignee_id": tenant.people[1].id, "team_id": tenant.team.id,
         "mentions": [tenant.people[1].id], "custom": {"z": 0}},
    ]
    made = [await store.create_conversation(tenant.id, body, None) for body in bodies]
    return tenant, [m.id for m in made]


@settings(max_examples=15, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(writes=st.lists(_write(), min_size=1, max_size=10))
async def test_a_group_of_random_writes_equals_the_same_writes_one_at_a_time(
        store: SQLStore, world: World, groups: list[int], writes: list[dict[str, Any]]
) -> None:
    foreign = (await store.create_conversation(world.away.id, {}, None)).id
    grouped, grouped_ids = await _tenant_with_conversations(store, "grouped", world.away)
    serial, serial_ids = await _tenant_with_conversations(store, "serial", world.away)
    names = {"grouped": _Names(grouped, world.away, grouped_ids, foreign),
             "serial": _Names(serial, world.away, serial_ids, foreign)}

    def call(who: str, write: dict[str, Any]) -> Callable[[], Awaitable[Image]]:
        n = names[who]
        body = n.body(write["body"])
        if who == "serial":  # the oracle: the SQLAlchemy path, one transaction per write
            return lambda: sqlalchemy_path(store, n.tenant.id, write, n, body)
        if write["create"]:
            return lambda: store.create_conversation(n.tenant.id, body, None)
        return lambda: store.update_conversation(n.tenant.id, n.target(write["target"]), body,
                                                 write["if_match"])

    start = await store.outbox_position()
    groups.clear()
    together_results = await together(store, [call("grouped", w) for w in writes])
    assert groups[0] == len(writes)  # they did run as one group
    one_by_one = [await outcome(call("serial", w)()) for w in writes]

    for w, (g, s) in enumerate(zip(together_results, one_by_one, strict=True)):
        assert g[0] == s[0], (w, g, s)
        if g[0] == "err":
            assert type(g[1]) is type(s[1]), (w, g, s)
            assert getattr(g[1], "path", None) == getattr(s[1], "path", None), (w, g, s)
        else:
            new_g, new_s = g[1].id not in grouped_ids, s[1].id not in serial_ids
            assert new_g == new_s
            if new_g:  # a create: remember its id, so later writes' images compare
                grouped_ids.append(g[1].id)
                serial_ids.append(s[1].id)
            assert names["grouped"].image(g[1]) == names["serial"].image(s[1]), w
            assert bool(g[2]) == bool(s[2])
    positions = [g[2] for g in together_results if g[2]]
    assert positions == sorted(positions)
    entries = await entries_since(store, start)
    logs, finals = {}, {}
    for who, ids in (("grouped", grouped_ids), ("serial", serial_ids)):
        n = names[who]
        logs[who] = [(e.version, n.image(e.before), n.image(e.after))  # type: ignore[arg-type]
                     for e in entries if e.workspace_id == n.tenant.id]
        snapshot = await store.snapshot(n.tenant.id)
        assert len(snapshot.conversations) == len(ids)
        finals[who] = sorted(n.image(i) for i in snapshot.conversations)
    assert logs["grouped"] == logs["serial"]
    assert finals["grouped"] == finals["serial"]
    assert [e.position for e in entries if e.workspace_id == grouped.id] == positions


async def test_writes_fail_rather_than_wait_when_the_writer_cannot_take_them(
        store: SQLStore, world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    made = await store.create_conversation(world.home.id, {}, None)
    assert store._writer is not None
    for _ in range(1000):  # the drain that committed it has finished (it could take more)
        if not store._draining:
            break
        await asyncio.sleep(0.001)

    def refuse(*args: Any) -> None:
        raise RuntimeError("cannot schedule new futures after shutdown")

    monkeypatch.setattr(store._writer, "submit", refuse)
    results = await asyncio.wait_for(asyncio.gather(*(outcome(store.update_conversation(
        world.home.id, made.id, {"custom": {"n": i}}, None)) for i in range(3))), 5)
    assert [type(r[1]).__name__ for r in results] == ["StoreError"] * 3
    monkeypatch.undo()
    assert (await store.update_conversation(world.home.id, made.id, {"priority": True},
                                            None)).version == 2
