"""The outbox: one row per write in the write's own transaction, in commit order, and snapshots
that agree with it; on every backend. (PostgreSQL's commit order across processes and its
notifications are tested in test_postgres.py.)"""

from __future__ import annotations

import asyncio
import random
import threading
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from livecount.domain import STATES, Image, now_us
from livecount.exceptions import (
    LivecountError,
    NotFound,
    PreconditionFailed,
    ValidationError,
)
from livecount.store.base import OutboxEntry, View
from livecount.store.seed import FOLDERS
from livecount.store.sqlstore import MAX_OUTBOX_BATCH, SQLStore

from .conftest import World, dump, make_tenant, other_connection

pytestmark = pytest.mark.anyio

OPEN = {"field": "state", "operator": "=", "value": "open"}


async def entries_since(store: SQLStore, position: int) -> list[OutboxEntry]:
    return await store.read_outbox(position, MAX_OUTBOX_BATCH)


async def test_a_new_workspace_logs_its_folders(store: SQLStore) -> None:
    t0 = now_us()
    workspace = await store.create_workspace("w")
    entries = await entries_since(store, 0)
    folders = await store.list_views(workspace.id)
    assert [e.position for e in entries] == list(range(1, len(FOLDERS) + 1))
    assert [e.after for e in entries] == folders
    for entry, view in zip(entries, folders, strict=True):
        assert (entry.kind, entry.workspace_id, entry.entity_id, entry.version, entry.before) == (
            "view",
            workspace.id,
            view.id,
            1,
            None,
        )
        assert t0 <= entry.committed_at <= now_us()
    assert await store.outbox_position() == len(FOLDERS)


async def test_each_conversation_write_logs_one_entry(store: SQLStore, world: World) -> None:
    start = await store.outbox_position()
    t0 = now_us()
    created = await store.create_conversation(
        world.home.id, {"tags": ["a"], "custom": {"n": 2.5}}, None
    )
    [entry] = await entries_since(store, start)
    assert entry == OutboxEntry(
        position=start + 1,
        workspace_id=world.home.id,
        kind="conversation",
        entity_id=created.id,
        version=1,
        before=None,
        after=created,
        committed_at=entry.committed_at,
    )
    assert isinstance(entry.after, Image)
    assert t0 <= entry.committed_at <= now_us()
    patched = await store.update_conversation(
        world.home.id, created.id, {"assignee_id": world.home.people[0].id}, None
    )
    [entry] = await entries_since(store, start + 1)
    assert (entry.position, entry.kind, entry.entity_id, entry.version) == (
        start + 2,
        "conversation",
        created.id,
        2,
    )
    assert entry.before == created and entry.after == patched
    assert await store.outbox_position() == start + 2


async def test_each_view_write_logs_one_entry(store: SQLStore, world: World) -> None:
    start = await store.outbox_position()
    view = await store.create_view(world.home.id, "v", OPEN, None, None)
    updated = await store.update_view(world.home.id, view.id, "w", OPEN, "team_id", 3)
    await store.delete_view(world.home.id, view.id)
    entries = await entries_since(store, start)
    assert [(e.position, e.kind, e.entity_id, e.workspace_id, e.version) for e in entries] == [
        (start + i, "view", view.id, world.home.id, i) for i in (1, 2, 3)
    ]
    assert [(e.before, e.after) for e in entries] == [
        (None, view),
        (view, updated),
        (updated, None),
    ]
    assert all(isinstance(e.after, View) for e in entries[:2])


async def test_people_teams_and_settings_do_not_touch_the_outbox(
    store: SQLStore, world: World
) -> None:
    start = await store.outbox_position()
    await store.create_teammate(world.home.id, "c", "c@h")
    await store.create_team(world.home.id, "t", [])
    await store.set_setting_if_absent("k", "v")
    assert await store.outbox_position() == start


async def test_read_outbox_pages(store: SQLStore, world: World) -> None:
    for _ in range(5):
        await store.create_conversation(world.home.id, {}, None)
    everything = await entries_since(store, 0)
    assert len(everything) == 2 * len(FOLDERS) + 5
    pages: list[OutboxEntry] = []
    position = 0
    while batch := await store.read_outbox(position, 3):
        assert len(batch) <= 3
        pages += batch
        position = batch[-1].position
    assert pages == everything
    assert await store.read_outbox(everything[-1].position, 10) == []
    assert await store.read_outbox(10**12, 10) == []
    for after, limit, path in (
        (-1, 10, "after"),
        ("0", 10, "after"),
        (0, 0, "limit"),
        (0, MAX_OUTBOX_BATCH + 1, "limit"),
        (0, True, "limit"),
    ):
        with pytest.raises(ValidationError) as info:
            await store.read_outbox(after, limit)
        assert info.value.path == path


# -- failed writes -------------------------------------------------------------------------------


async def failing_writes(store: SQLStore, world: World) -> list[tuple[str, Any]]:
    """(label, coroutine factory) for writes that must fail without a trace."""
    home, away = world.home, world.away
    conversation = await store.create_conversation(home.id, {}, None)
    theirs = await store.create_conversation(away.id, {}, None)
    view = await store.create_view(home.id, "v", OPEN, None, None)
    await store.update_conversation(home.id, conversation.id, {"priority": True}, None)
    stranger = away.people[0].id
    return [
        ("bad body", lambda: store.create_conversation(home.id, {"x": 1}, None)),
        (
            "foreign mention",
            lambda: store.create_conversation(
                home.id, {"mentions": [home.people[0].id, stranger]}, None
            ),
        ),
        (
            "foreign team",
            lambda: store.create_conversation(home.id, {"team_id": away.team.id}, None),
        ),
        ("missing workspace", lambda: store.create_conversation(10**6, {}, None)),
        (
            "stale if_match",
            lambda: store.update_conversation(home.id, conversation.id, {"state": "closed"}, 1),
        ),
        (
            "foreign assignee",
            lambda: store.update_conversation(
                home.id, conversation.id, {"assignee_id": stranger}, None
            ),
        ),
        (
            "foreign conversation",
            lambda: store.update_conversation(home.id, theirs.id, {"state": "closed"}, None),
        ),
        (
            "too many custom keys",
            lambda: store.update_conversation(
                home.id, conversation.id, {"custom": {f"k{i}": i for i in range(51)}}, None
            ),
        ),
        (
            "bad view filter",
            lambda: store.create_view(home.id, "v", {"operator": "OR", "value": []}, None, None),
        ),
        ("foreign view owner", lambda: store.create_view(home.id, "v", OPEN, None, stranger)),
        (
            "bad view update",
            lambda: store.update_view(home.id, view.id, "v", OPEN, "created_at", None),
        ),
        ("foreign view delete", lambda: store.delete_view(away.id, view.id)),
        ("duplicate email", lambda: store.create_teammate(home.id, "x", "ann@home.test")),
        ("foreign team member", lambda: store.create_team(home.id, "t", [stranger])),
    ]


async def test_failed_writes_leave_no_trace(store: SQLStore, world: World) -> None:
    calls: list[str] = []
    store.on_commit(lambda: calls.append("commit"))
    for label, write in await failing_writes(store, world):
        before = await dump(store)
        commits = len(calls)
        with pytest.raises(LivecountError):
            await write()
        assert await dump(store) == before, label
        assert len(calls) == commits, label


async def test_a_write_that_breaks_midway_is_rolled_back(
    store: SQLStore, world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The conversation row is written before its outbox row: if the latter fails, neither
    stays."""
    before = await dump(store)

    def broken(*args: Any) -> None:
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(store, "_append_outbox", broken)
    with pytest.raises(RuntimeError, match="disk on fire"):
        await store.create_conversation(world.home.id, {"tags": ["a"], "custom": {"x": 1}}, None)
    with pytest.raises(RuntimeError):
        await store.create_view(world.home.id, "v", OPEN, None, None)
    with pytest.raises(RuntimeError):
        await store.create_workspace("half")
    assert await dump(store) == before
    monkeypatch.undo()
    image = await store.create_conversation(world.home.id, {}, None)  # still writable
    assert (await entries_since(store, 0))[-1].after == image


# -- commit order and notifications --------------------------------------------------------------


async def test_positions_follow_commit_order_under_concurrent_writers(
    store: SQLStore, world: World
) -> None:
    tenants = [world.home, world.away]
    start = await store.outbox_position()
    seeds = [await store.create_conversation(t.id, {}, None) for t in tenants for _ in range(5)]
    rng = random.Random(7)

    async def writer(i: int) -> Image | View:
        target = rng.choice(seeds)
        match i % 4:
            case 0:
                return await store.create_conversation(
                    target.workspace_id, {"tags": [str(i)]}, None
                )
            case 3:
                return await store.create_view(target.workspace_id, f"v{i}", OPEN, None, None)
            case _:
                return await store.update_conversation(
                    target.workspace_id, target.id, {"custom": {"i": i}}, None
                )

    results = await asyncio.gather(*(writer(i) for i in range(300)))
    entries = await entries_since(store, start)
    assert len(entries) == len(seeds) + 300
    positions = [e.position for e in entries]
    assert positions == list(range(start + 1, start + 1 + len(entries)))
    # commit order is visible per entity: versions go 1, 2, 3, ... in position order
    last: dict[tuple[str, int], int] = {}
    for entry in entries:
        key = (entry.kind, entry.entity_id)
        assert entry.version == last.get(key, 0) + 1
        if entry.kind == "conversation":
            assert isinstance(entry.after, Image)
            assert entry.before is None or entry.before.version == entry.version - 1
        last[key] = entry.version
    # every write that returned is in the log with exactly what it returned
    logged = {(e.kind, e.entity_id, e.version): e.after for e in entries}
    for result in results:
        kind = "view" if isinstance(result, View) else "conversation"
        assert logged[kind, result.id, result.version] == result


async def test_on_commit(store: SQLStore, world: World, db_url: str) -> None:
    seen: list[tuple[str, int]] = []

    def callback() -> None:
        # runs after the commit: a separate connection already sees the new outbox row
        with other_connection(db_url) as conn:
            cursor = conn.cursor()
            cursor.execute("SELECT COUNT(*) FROM outbox")
            (rows,) = cursor.fetchone()
        seen.append((threading.current_thread().name, rows))

    def broken() -> None:
        raise RuntimeError("a bad subscriber must not fail the write")

    start = await store.outbox_position()
    unsubscribe = store.on_commit(callback)
    unsubscribe_broken = store.on_commit(broken)
    await store.create_conversation(world.home.id, {}, None)
    await asyncio.gather(
        *(store.create_view(world.home.id, f"v{i}", OPEN, None, None) for i in range(5))
    )
    await store.create_workspace("another")  # one transaction: one notification
    await store.create_teammate(world.home.id, "x", "x@h")  # no outbox row: no notification
    assert len(seen) == 7
    assert all(name.startswith("livecount-store-write") for name, _ in seen)
    assert [rows for _, rows in seen][:6] == list(range(start + 1, start + 7))
    assert seen[-1][1] == start + 6 + len(FOLDERS)
    unsubscribe()
    unsubscribe()  # idempotent
    await store.create_conversation(world.home.id, {}, None)
    assert len(seen) == 7
    unsubscribe_broken()


async def test_on_commit_wakes_an_event_loop(store: SQLStore, world: World) -> None:
    """The relay's pattern: hop back to the loop with call_soon_threadsafe."""
    loop = asyncio.get_running_loop()
    woken = asyncio.Event()
    unsubscribe = store.on_commit(lambda: loop.call_soon_threadsafe(woken.set))
    try:
        await store.create_conversation(world.home.id, {}, None)
        await asyncio.wait_for(woken.wait(), 5)
    finally:
        unsubscribe()


# -- snapshots -----------------------------------------------------------------------------------


def check_snapshot_against_log(
    snapshot_position: int,
    conversations: list[Image],
    views: list[View],
    entries: list[OutboxEntry],
    workspace_id: int,
) -> None:
    """Replaying the log up to the snapshot's position yields exactly the snapshot."""
    images: dict[int, Image] = {}
    live_views: dict[int, View] = {}
    for entry in entries:
        if entry.position > snapshot_position or entry.workspace_id != workspace_id:
            continue
        if entry.kind == "conversation":
            assert isinstance(entry.after, Image)
            images[entry.entity_id] = entry.after
        elif entry.after is None:
            live_views.pop(entry.entity_id, None)
        else:
            assert isinstance(entry.after, View)
            live_views[entry.entity_id] = entry.after
    assert {c.id: c.version for c in conversations} == {i: c.version for i, c in images.items()}
    assert conversations == sorted(images.values(), key=lambda c: c.id)
    assert views == sorted(live_views.values(), key=lambda v: (v.position, v.id))


async def test_snapshots_agree_with_the_log_while_a_writer_runs(
    store: SQLStore, world: World
) -> None:
    home = world.home.id
    seeds = [await store.create_conversation(home, {}, None) for _ in range(10)]
    rng = random.Random(3)
    stop = asyncio.Event()

    async def keep_writing() -> int:
        writes = 0
        while not stop.is_set():
            target = rng.choice(seeds)
            if writes % 10 == 9:
                await store.create_conversation(home, {"tags": ["new"]}, None)
            elif writes % 10 == 8:
                await store.create_view(home, f"v{writes}", OPEN, None, None)
            else:
                await store.update_conversation(
                    home, target.id, {"state": rng.choice(STATES), "custom": {"w": writes}}, None
                )
            writes += 1
        return writes

    writing = asyncio.ensure_future(keep_writing())
    snapshots = []
    try:
        for _ in range(25):
            snapshots.append(await store.snapshot(home))
            await asyncio.sleep(0.002)
    finally:
        stop.set()
        writes = await writing
    assert writes > 25
    positions = [s.position for s in snapshots]
    assert positions == sorted(positions) and positions[-1] > positions[0]
    entries = await entries_since(store, 0)
    for snap in snapshots:
        check_snapshot_against_log(snap.position, snap.conversations, snap.views, entries, home)


async def test_snapshot_is_per_workspace(store: SQLStore, world: World) -> None:
    mine = await store.create_conversation(world.home.id, {}, None)
    await store.create_conversation(world.away.id, {}, None)
    snap = await store.snapshot(world.home.id)
    assert snap.conversations == [mine]
    assert snap.views == await store.list_views(world.home.id)
    assert snap.position == await store.outbox_position()
    with pytest.raises(NotFound):
        await store.snapshot(999)


# -- property: the log replays to the state ------------------------------------------------------

#: A person or team slot: 0 and 1 are the workspace's own, 2 belongs to another workspace.
slots = st.integers(0, 2)
tags = st.lists(st.sampled_from(["vip", "bug", "billing", "é"]), max_size=3)
custom_values = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-5, 5),
    st.sampled_from([0.5, 2.0, -1.25]),
    st.sampled_from(["pro", "", "x"]),
)
stamps = st.one_of(
    st.none(), st.sampled_from(["2024-01-01T00:00:00Z", "2030-06-01T12:30:00.000001Z"])
)
fields = st.fixed_dictionaries(
    {},
    optional={
        "state": st.sampled_from(STATES),
        "assignee_id": st.none() | slots,
        "team_id": st.none() | slots,
        "priority": st.booleans(),
        "channel": st.sampled_from(["chat", "email"]),
        "tags": tags,
        "mentions": st.lists(slots, max_size=2),
        "unread_by": st.lists(slots, max_size=2),
        "waiting_since": stamps,
        "snoozed_until": stamps,
        "custom": st.dictionaries(
            st.sampled_from(["plan", "seats", "t"]), custom_values, max_size=3
        ),
    },
)
#: (kind, fields, which conversation to patch, if_match). Patches outnumber creates three to
#: one and aim at the few newest conversations, so versions climb high.
_patch = st.tuples(
    st.just("patch"), fields, st.integers(0, 3), st.sampled_from([None, None, "current", "stale"])
)
operations = st.lists(
    st.one_of(st.tuples(st.just("create"), fields, st.just(0), st.none()), _patch, _patch, _patch),
    max_size=30,
)


def resolve(body: dict[str, Any], people: list[int], teams: list[int]) -> dict[str, Any]:
    """Turn generated slots into real ids."""
    out = dict(body)
    for name in ("assignee_id", "team_id"):
        if out.get(name) is not None:
            out[name] = (teams if name == "team_id" else people)[out[name]]
    for name in ("mentions", "unread_by"):
        if name in out:
            out[name] = [people[i] for i in out[name]]
    if "custom" in out and not out["custom"]:
        out["custom"] = None
    return out


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(ops=operations)
async def test_replaying_the_log_reproduces_the_snapshot(
    store: SQLStore, ops: list[Any]
) -> None:
    # a fresh pair of workspaces per example: the store itself is shared by all examples
    home = await make_tenant(store, "home")
    away = await make_tenant(store, "away")
    people = [p.id for p in home.people] + [away.people[0].id]
    teams = [home.team.id, home.team.id, away.team.id]
    model: dict[int, Image] = {}
    for kind, body, index, if_match in ops:
        resolved = resolve(body, people, teams)
        foreign = any(
            resolved.get(name) == (teams if name == "team_id" else people)[2]
            for name in ("assignee_id", "team_id")
        ) or any(people[2] in resolved.get(name, ()) for name in ("mentions", "unread_by"))
        before = await store.outbox_position()
        try:
            if kind == "create" or not model:
                image = await store.create_conversation(home.id, resolved, home.people[0].id)
            else:
                target = sorted(model, reverse=True)[index % len(model)]
                version = model[target].version
                pinned = {None: None, "current": version, "stale": version - 1}[if_match]
                image = await store.update_conversation(home.id, target, resolved, pinned)
        except ValidationError as exc:
            assert foreign or "more than 50 keys" in str(exc), exc
            assert await store.outbox_position() == before
            continue
        except PreconditionFailed:
            assert if_match == "stale"
            assert await store.outbox_position() == before
            continue
        assert not foreign
        grew = await store.outbox_position() - before
        assert grew == (1 if image.id not in model or image != model[image.id] else 0)
        model[image.id] = image
    snapshot = await store.snapshot(home.id)
    assert snapshot.conversations == sorted(model.values(), key=lambda c: c.id)
    replayed: dict[int, Image] = {}
    for entry in await entries_since(store, 0):
        if entry.workspace_id == home.id and entry.kind == "conversation":
            assert isinstance(entry.after, Image)
            replayed[entry.entity_id] = entry.after
    assert sorted(replayed.values(), key=lambda c: c.id) == snapshot.conversations
    check_snapshot_against_log(
        snapshot.position,
        snapshot.conversations,
        snapshot.views,
        await entries_since(store, 0),
        home.id,
    )
