"""The Store contract on every backend (SQLite and PostgreSQL): every method, every error,
lifecycle and resource bounds. The few tests about one backend's files or connections say so
(``sqlite_only``); PostgreSQL's own are in test_postgres.py."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import msgspec
import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Connection

from livecount.domain import now_us
from livecount.exceptions import (
    Conflict,
    LimitExceeded,
    NotFound,
    PreconditionFailed,
    StoreError,
    Unavailable,
    ValidationError,
)
from livecount.filters.parse import parse_filter
from livecount.store import Store, open_store, sqlstore
from livecount.store.base import View
from livecount.store.postgres import PostgresStore
from livecount.store.schema import teammates
from livecount.store.seed import FOLDERS
from livecount.store.sqlite import SQLiteStore
from livecount.store.sqlstore import MAX_VIEWS, SQLStore, hash_token

from .conftest import World, dump, other_connection, sqlite_only

pytestmark = pytest.mark.anyio

OPEN = {"field": "state", "operator": "=", "value": "open"}
VIP = {
    "operator": "AND",
    "value": [OPEN, {"field": "tags", "operator": "contains", "value": "vip"}],
}


def store_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("livecount-store")]


# -- lifecycle and resources -------------------------------------------------------------------


async def test_threads_after_close_equal_threads_before_open(db_url: str) -> None:
    before = threading.active_count()
    store = open_store(db_url)
    await store.open()
    workspace = await store.create_workspace("w")
    # enough concurrent reads to start both readers
    await asyncio.gather(*(store.list_views(workspace.id) for _ in range(20)))
    names = store_threads()
    assert sum(n.startswith("livecount-store-write") for n in names) == 1
    assert sum(n.startswith("livecount-store-read") for n in names) in (1, 2)
    await store.close()
    assert threading.active_count() == before
    assert store_threads() == []


async def test_threads_stay_bounded_under_load(store: SQLStore, world: World) -> None:
    """The store's four threads (writer, two readers, the relay's reader) all start when it
    opens and are the only ones it ever has: load neither adds nor replaces one."""
    started = set(store_threads())
    assert len(started) == 4
    seen: set[str] = set()

    async def work(i: int) -> None:
        if i % 2:
            await store.create_conversation(world.home.id, {"tags": [f"t{i}"]}, None)
        else:
            await store.list_views(world.home.id)
        seen.update(store_threads())

    await asyncio.gather(*(work(i) for i in range(200)))
    assert seen == started
    assert set(store_threads()) == started


async def test_calls_waiting_for_the_store_are_bounded(store: SQLStore, world: World,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Past the bound a call is refused at once (503) rather than queued without end; the
    calls already queued still complete, and nothing was half-written."""
    monkeypatch.setattr(sqlstore, "MAX_PENDING_CALLS", 10)
    results = await asyncio.gather(
        *(store.create_conversation(world.home.id, {}, None) for _ in range(40)),
        return_exceptions=True)
    refused = [r for r in results if isinstance(r, Unavailable)]
    made = [r for r in results if not isinstance(r, BaseException)]
    assert refused and len(made) >= 10 and len(refused) + len(made) == 40
    page = await store.snapshot(world.home.id)
    assert len([c for c in page.conversations if c.id in {m.id for m in made}]) == len(made)
    await store.create_conversation(world.home.id, {}, None)  # and it recovers


async def test_every_method_refuses_before_open_and_after_close(db_url: str) -> None:
    store = open_store(db_url)
    calls: list[Callable[[], Awaitable[Any]]] = [
        lambda: store.create_workspace("w"),
        lambda: store.get_workspace(1),
        lambda: store.list_workspaces(),
        lambda: store.create_teammate(1, "a", "a@x"),
        lambda: store.list_teammates(1),
        lambda: store.authenticate("lc_nope"),
        lambda: store.authenticate("not-a-token"),
        lambda: store.create_team(1, "t", []),
        lambda: store.list_teams(1),
        lambda: store.get_setting("k"),
        lambda: store.set_setting_if_absent("k", "v"),
        lambda: store.create_conversation(1, {}, None),
        lambda: store.update_conversation(1, 1, {}, None),
        lambda: store.get_conversation(1, 1),
        lambda: store.list_views(1),
        lambda: store.get_view(1, 1),
        lambda: store.create_view(1, "v", OPEN, None, None),
        lambda: store.update_view(1, 1, "v", OPEN, None, None),
        lambda: store.delete_view(1, 1),
        lambda: store.read_outbox(0, 10),
        lambda: store.outbox_position(),
        lambda: store.snapshot(1),
    ]
    for call in calls:
        with pytest.raises(StoreError, match="not open"):
            await call()
    await store.open()
    await store.close()
    for call in calls:
        with pytest.raises(StoreError, match="not open"):
            await call()


async def test_open_twice_is_refused_and_close_is_idempotent(db_url: str) -> None:
    store = open_store(db_url)
    await store.close()  # never opened: nothing to do
    await store.open()
    with pytest.raises(StoreError, match="already open"):
        await store.open()
    await store.close()
    await store.close()


async def test_reopen_keeps_the_data(db_url: str) -> None:
    store = open_store(db_url)
    await store.open()
    workspace = await store.create_workspace("kept")
    await store.close()
    await store.open()
    try:
        assert await store.get_workspace(workspace.id) == workspace
        assert len(await store.list_views(workspace.id)) == len(FOLDERS)
    finally:
        await store.close()


async def test_close_waits_for_calls_in_flight(db_url: str) -> None:
    store = open_store(db_url)
    await store.open()
    workspace = await store.create_workspace("w")
    writes = [
        asyncio.ensure_future(store.create_conversation(workspace.id, {"tags": [str(i)]}, None))
        for i in range(50)
    ]
    await asyncio.sleep(0)
    await store.close()
    results = await asyncio.gather(*writes, return_exceptions=True)
    assert all(not isinstance(r, BaseException) for r in results)
    assert store_threads() == []
    await store.open()
    try:
        assert await store.outbox_position() == len(FOLDERS) + 50
    finally:
        await store.close()


async def test_a_failed_open_leaves_no_thread_behind(tmp_path: Path) -> None:
    before = threading.active_count()
    store = SQLiteStore(f"sqlite:///{tmp_path / 'missing-dir' / 'x.db'}")
    with pytest.raises(StoreError):
        await store.open()
    assert threading.active_count() == before
    await store.close()


@sqlite_only
async def test_connections_are_configured(store: SQLStore) -> None:
    def pragmas(conn: Connection) -> tuple[Any, ...]:
        return tuple(
            conn.exec_driver_sql(f"PRAGMA {name}").scalar()
            for name in ("journal_mode", "synchronous", "busy_timeout", "foreign_keys")
        )

    expected = ("wal", 1, 5000, 1)  # synchronous 1 = NORMAL
    assert await store._read(pragmas) == expected
    assert await store._write(pragmas) == expected


async def test_a_read_is_one_snapshot(store: SQLStore, world: World) -> None:
    """pysqlite alone does not BEGIN before a SELECT; the store's reads must see one snapshot
    even when a write commits between two of their statements."""
    loop = asyncio.get_running_loop()
    first_read = asyncio.Event()
    write_done = threading.Event()

    def read_twice(conn: Connection) -> tuple[int, int]:
        query = sa.text("SELECT COUNT(*) FROM conversations")
        one = conn.execute(query).scalar_one()
        loop.call_soon_threadsafe(first_read.set)
        assert write_done.wait(10)
        return one, conn.execute(query).scalar_one()

    reading = asyncio.ensure_future(store._read(read_twice))
    await first_read.wait()
    await store.create_conversation(world.home.id, {}, None)
    write_done.set()
    one, two = await reading
    assert one == two == 0
    assert len((await store.snapshot(world.home.id)).conversations) == 1


def test_in_memory_urls_are_refused() -> None:
    for url in (
        "sqlite://",
        "sqlite:///:memory:",
        "sqlite:///file::memory:?uri=true",
        "sqlite:///x.db?mode=memory&uri=true",
    ):
        with pytest.raises(ValidationError, match="in-memory SQLite is not supported"):
            SQLiteStore(url)


def test_open_store_chooses_the_backend_by_scheme(tmp_path: Path) -> None:
    store = open_store(f"sqlite:///{tmp_path / 'a.db'}")
    assert isinstance(store, SQLiteStore)
    assert store.url == f"sqlite:///{tmp_path / 'a.db'}"
    for url in ("postgresql://postgres@127.0.0.1/test", "postgres://u:p@db:5433/lc",
                "postgresql+psycopg://postgres@127.0.0.1/test?sslmode=disable"):
        chosen = open_store(url)
        assert isinstance(chosen, PostgresStore) and chosen.url == url
    for url in ("postgresql+psycopg2://x@y/z", "postgresql://x@y", "postgresql://x@y/"):
        with pytest.raises(ValidationError, match="postgresql://user@host:5432/database"):
            open_store(url)
    for url in ("mysql://x/y", "nonsense", ""):
        with pytest.raises(ValidationError, match="unsupported store URL"):
            open_store(url)
    with pytest.raises(ValidationError):
        SQLiteStore("postgresql://x/y")


def test_sqlite_store_satisfies_the_protocol(tmp_path: Path) -> None:
    store: Store = SQLiteStore(f"sqlite:///{tmp_path / 'a.db'}")
    assert store.url.startswith("sqlite:///")


async def test_database_errors_become_store_errors(store: SQLStore) -> None:
    def broken(conn: Connection) -> None:
        conn.exec_driver_sql("SELECT * FROM no_such_table")

    with pytest.raises(StoreError, match="database error"):
        await store._read(broken)


# -- workspaces ----------------------------------------------------------------------------------


async def test_create_workspace_seeds_the_folders(store: SQLStore) -> None:
    workspace = await store.create_workspace("Acme")
    assert workspace.name == "Acme"
    folders = await store.list_views(workspace.id)
    assert [(v.name, v.group_by, v.position, v.owner_id, v.version) for v in folders] == [
        ("Your inbox", None, 0, None, 1),
        ("Mentions", None, 1, None, 1),
        ("Created by you", None, 2, None, 1),
        ("Unassigned", None, 3, None, 1),
        ("All", None, 4, None, 1),
        ("Team inboxes", "team_id", 5, None, 1),
        ("Teammates", "assignee_id", 6, None, 1),
    ]
    for view, folder in zip(folders, FOLDERS, strict=True):
        assert view.filter == folder.filter
        assert view.workspace_id == workspace.id
        parse_filter(view.filter)
    assert folders[0].filter == {
        "operator": "AND",
        "value": [OPEN, {"field": "assignee_id", "operator": "=", "value": "$me"}],
    }
    assert folders[4].filter == OPEN


async def test_workspaces_get_and_list(store: SQLStore) -> None:
    a = await store.create_workspace("a")
    b = await store.create_workspace("b")
    assert await store.list_workspaces() == [a, b]
    assert await store.get_workspace(b.id) == b
    for missing in (b.id + 1, 0, -1, 2**70, True, "1"):
        with pytest.raises(NotFound, match=f"workspace {missing} not found"):
            await store.get_workspace(missing)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "name, message",
    [
        ("", "name: must not be empty"),
        (None, "name: expected a string, got null"),
        (5, "name: expected a string, got number"),
        ("x" * 201, "name: longer than 200 characters"),
        ("a\x00b", "name: strings must not contain NUL"),
    ],
)
async def test_workspace_names_are_validated(store: SQLStore, name: Any, message: str) -> None:
    with pytest.raises(ValidationError) as info:
        await store.create_workspace(name)
    assert str(info.value).startswith(message)
    assert info.value.path == "name"
    assert await store.list_workspaces() == []
    assert await store.outbox_position() == 0


async def test_a_200_character_name_is_fine(store: SQLStore) -> None:
    assert (await store.create_workspace("x" * 200)).name == "x" * 200


# -- teammates, teams, settings ------------------------------------------------------------------


async def test_teammates_and_tokens(store: SQLStore, world: World) -> None:
    teammate, token = await store.create_teammate(world.home.id, "Cleo", "cleo@home.test")
    assert teammate.name == "Cleo" and teammate.email == "cleo@home.test"
    assert teammate.workspace_id == world.home.id
    assert token.startswith("lc_") and len(token) >= 40
    assert await store.authenticate(token) == teammate
    assert await store.authenticate(token + "x") is None
    assert await store.authenticate(token[:-1]) is None
    assert await store.authenticate("") is None
    assert await store.authenticate("lc_") is None
    assert await store.authenticate(hash_token(token)) is None

    def stored(conn: Connection) -> list[tuple[Any, ...]]:
        return [tuple(r) for r in conn.execute(sa.select(teammates))]

    rows = await store._read(stored)
    assert not any(token in str(value) for row in rows for value in row)
    assert (teammate.id, world.home.id, "Cleo", "cleo@home.test", hash_token(token)) in rows


async def test_tokens_differ(store: SQLStore, world: World) -> None:
    tokens = {(await store.create_teammate(world.home.id, "x", f"x{i}@h"))[1] for i in range(5)}
    assert len(tokens) == 5


async def test_list_teammates_is_per_workspace(store: SQLStore, world: World) -> None:
    assert await store.list_teammates(world.home.id) == world.home.people
    assert await store.list_teammates(world.away.id) == world.away.people
    with pytest.raises(NotFound):
        await store.list_teammates(999)


async def test_duplicate_email_is_a_conflict(store: SQLStore, world: World) -> None:
    before = await dump(store)
    with pytest.raises(Conflict):
        await store.create_teammate(world.home.id, "Ann again", "ann@home.test")
    assert await dump(store) == before
    # the same address in another workspace is another person
    other, _ = await store.create_teammate(world.away.id, "Ann", "ann@home.test")
    assert other.workspace_id == world.away.id


@pytest.mark.parametrize(
    "name, email, message",
    [
        ("", "a@b", "name: must not be empty"),
        ("x" * 201, "a@b", "name: longer than 200"),
        (1, "a@b", "name: expected a string"),
        ("a", "", "email: must not be empty"),
        ("a", "no-at-sign", "email: expected an email address"),
        ("a", "a@" + "b" * 199, "email: longer than 200"),
        ("a", None, "email: expected a string"),
    ],
)
async def test_teammate_fields_are_validated(
    store: SQLStore, world: World, name: Any, email: Any, message: str
) -> None:
    with pytest.raises(ValidationError, match=f"^{message}"):
        await store.create_teammate(world.home.id, name, email)


async def test_teammate_in_a_missing_workspace(store: SQLStore) -> None:
    with pytest.raises(NotFound, match="workspace 42 not found"):
        await store.create_teammate(42, "a", "a@b")


async def test_teams(store: SQLStore, world: World) -> None:
    ann, bob = world.home.people
    team = await store.create_team(world.home.id, "billing", [bob.id, ann.id, bob.id])
    assert team.member_ids == sorted([ann.id, bob.id])
    empty = await store.create_team(world.home.id, "empty", [])
    assert await store.list_teams(world.home.id) == [world.home.team, team, empty]
    assert await store.list_teams(world.away.id) == [world.away.team]
    with pytest.raises(NotFound):
        await store.list_teams(12345)


async def test_team_members_must_belong_to_the_workspace(store: SQLStore, world: World) -> None:
    before = await dump(store)
    stranger = world.away.people[0].id
    with pytest.raises(
        ValidationError, match=f"^member_ids: no teammate {stranger} in this workspace$"
    ):
        await store.create_team(world.home.id, "t", [world.home.people[0].id, stranger])
    with pytest.raises(ValidationError, match=r"^member_ids\[1\]: expected a positive integer"):
        await store.create_team(world.home.id, "t", [1, "2"])  # type: ignore[list-item]
    with pytest.raises(ValidationError, match=r"^member_ids: expected an array"):
        await store.create_team(world.home.id, "t", 3)  # type: ignore[arg-type]
    with pytest.raises(ValidationError, match=r"^name: must not be empty"):
        await store.create_team(world.home.id, "", [])
    with pytest.raises(NotFound):
        await store.create_team(999, "t", [])
    assert await dump(store) == before


async def test_settings(store: SQLStore) -> None:
    assert await store.get_setting("admin") is None
    assert await store.set_setting_if_absent("admin", "one") == "one"
    assert await store.set_setting_if_absent("admin", "two") == "one"
    assert await store.get_setting("admin") == "one"
    with pytest.raises(ValidationError, match=r"^key: "):
        await store.set_setting_if_absent("k" * 65, "v")
    with pytest.raises(ValidationError, match=r"^value: "):
        await store.set_setting_if_absent("k", 5)  # type: ignore[arg-type]


async def test_set_setting_if_absent_is_race_safe(store: SQLStore) -> None:
    results = await asyncio.gather(
        *(store.set_setting_if_absent("race", f"v{i}") for i in range(20))
    )
    assert len(set(results)) == 1
    assert await store.get_setting("race") == results[0]


# -- conversations -------------------------------------------------------------------------------


async def test_create_conversation_defaults(store: SQLStore, world: World) -> None:
    ann = world.home.people[0]
    t0 = now_us()
    image = await store.create_conversation(world.home.id, {}, ann.id)
    assert (
        image.workspace_id,
        image.version,
        image.state,
        image.assignee_id,
        image.team_id,
        image.author_id,
        image.priority,
        image.channel,
    ) == (world.home.id, 1, "open", None, None, ann.id, False, "chat")
    assert image.tags == image.mentions == image.unread_by == frozenset()
    assert image.custom == {}
    assert t0 <= image.created_at == image.updated_at <= now_us()
    assert await store.get_conversation(world.home.id, image.id) == image


async def test_create_conversation_with_every_field(store: SQLStore, world: World) -> None:
    ann, bob = world.home.people
    body = {
        "state": "snoozed",
        "assignee_id": ann.id,
        "team_id": world.home.team.id,
        "priority": True,
        "channel": "email",
        "tags": ["vip", "b"],
        "mentions": [bob.id],
        "unread_by": [ann.id, bob.id],
        "waiting_since": "2024-01-02T03:04:05Z",
        "snoozed_until": "2030-01-01T00:00:00Z",
        "custom": {"plan": "pro", "seats": 12, "ratio": 0.5, "trial": False},
    }
    image = await store.create_conversation(world.home.id, body, None)
    assert image.tags == {"vip", "b"} and image.mentions == {bob.id}
    assert image.custom == {"plan": "pro", "seats": 12, "ratio": 0.5, "trial": False}
    assert await store.get_conversation(world.home.id, image.id) == image
    assert image.author_id is None


async def test_ids_are_distinct_across_workspaces(store: SQLStore, world: World) -> None:
    a = await store.create_conversation(world.home.id, {}, None)
    b = await store.create_conversation(world.away.id, {}, None)
    c = await store.create_conversation(world.home.id, {}, None)
    assert len({a.id, b.id, c.id}) == 3


@pytest.mark.parametrize(
    "field, who",
    [
        ("assignee_id", "teammate"),
        ("team_id", "team"),
        ("mentions", "teammate"),
        ("unread_by", "teammate"),
        ("author_id", "teammate"),
    ],
)
async def test_conversations_name_only_their_own_workspace(
    store: SQLStore, world: World, field: str, who: str
) -> None:
    foreign = world.away.team.id if who == "team" else world.away.people[1].id
    value = [world.home.people[0].id, foreign] if field in ("mentions", "unread_by") else foreign
    before = await dump(store)
    expected = f"^{field}: no {who} {foreign} in this workspace$"
    with pytest.raises(ValidationError, match=expected):
        await store.create_conversation(world.home.id, {field: value}, None)
    assert await dump(store) == before
    if field == "author_id":  # also when the caller passes it
        with pytest.raises(ValidationError, match=expected):
            await store.create_conversation(world.home.id, {}, foreign)
        assert await dump(store) == before
        return
    image = await store.create_conversation(world.home.id, {}, None)
    before = await dump(store)
    with pytest.raises(ValidationError, match=expected):
        await store.update_conversation(world.home.id, image.id, {field: value}, None)
    assert await dump(store) == before


async def test_unknown_ids_are_never_found(store: SQLStore, world: World) -> None:
    theirs = await store.create_conversation(world.away.id, {}, None)
    nobody = theirs.id + 1000
    # another tenant's id reads exactly like an id that does not exist
    for cid in (theirs.id, nobody):
        with pytest.raises(NotFound) as info:
            await store.get_conversation(world.home.id, cid)
        assert info.value.message == f"conversation {cid} not found"
        with pytest.raises(NotFound) as info:
            await store.update_conversation(world.home.id, cid, {"priority": True}, None)
        assert info.value.message == f"conversation {cid} not found"
        # even with a patch that would fail the tenancy check
        with pytest.raises(NotFound):
            await store.update_conversation(
                world.home.id, cid, {"assignee_id": world.away.people[0].id}, None
            )
    for cid in (0, -5, 2**64, "1", None):
        with pytest.raises(NotFound):
            await store.get_conversation(world.home.id, cid)  # type: ignore[arg-type]
    with pytest.raises(NotFound, match="workspace 999 not found"):
        await store.create_conversation(999, {}, None)
    assert await store.get_conversation(world.away.id, theirs.id) == theirs


async def test_update_conversation(store: SQLStore, world: World) -> None:
    ann, bob = world.home.people
    image = await store.create_conversation(
        world.home.id, {"tags": ["a"], "custom": {"x": 1, "y": "keep"}}, None
    )
    patched = await store.update_conversation(
        world.home.id,
        image.id,
        {
            "assignee_id": ann.id,
            "tags": ["b", "c"],
            "custom": {"x": None, "z": True},
            "state": "closed",
        },
        None,
    )
    assert patched.version == 2
    assert patched.assignee_id == ann.id and patched.state == "closed"
    assert patched.tags == {"b", "c"}
    assert patched.custom == {"y": "keep", "z": True}
    assert patched.created_at == image.created_at <= patched.updated_at
    assert await store.get_conversation(world.home.id, image.id) == patched
    cleared = await store.update_conversation(
        world.home.id,
        image.id,
        {"assignee_id": None, "tags": None, "custom": None, "mentions": [bob.id]},
        2,
    )
    assert cleared.version == 3
    assert (cleared.assignee_id, cleared.tags, cleared.custom, cleared.mentions) == (
        None,
        frozenset(),
        {},
        frozenset({bob.id}),
    )
    assert await store.get_conversation(world.home.id, image.id) == cleared


async def test_if_match(store: SQLStore, world: World) -> None:
    image = await store.create_conversation(world.home.id, {}, None)
    await store.update_conversation(world.home.id, image.id, {"priority": True}, 1)
    before = await dump(store)
    for stale in (1, 3, 0):
        with pytest.raises(PreconditionFailed, match=f"at version 2, not {stale}"):
            await store.update_conversation(world.home.id, image.id, {"state": "closed"}, stale)
    assert await dump(store) == before
    with pytest.raises(ValidationError, match=r"^if_match"):
        await store.update_conversation(world.home.id, image.id, {}, "2")  # type: ignore[arg-type]
    done = await store.update_conversation(world.home.id, image.id, {"state": "closed"}, 2)
    assert done.version == 3


async def test_a_patch_that_changes_nothing_writes_nothing(
    store: SQLStore, world: World
) -> None:
    image = await store.create_conversation(world.home.id, {"tags": ["a"]}, None)
    before = await dump(store)
    assert await store.update_conversation(world.home.id, image.id, {}, None) == image
    assert (
        await store.update_conversation(
            world.home.id, image.id, {"tags": ["a"], "state": "open", "custom": {"k": None}}, 1
        )
        == image
    )
    assert await dump(store) == before
    with pytest.raises(PreconditionFailed):  # if_match still holds the caller to a version
        await store.update_conversation(world.home.id, image.id, {}, 7)


@pytest.mark.parametrize(
    "patch, message",
    [
        ({"version": 3}, "version: is set by the server"),
        ({"id": 3}, "id: is set by the server"),
        ({"author_id": 1}, "author_id: is set when the conversation is created"),
        ({"nope": 1}, "nope: unknown field"),
        ({"state": "gone"}, "state: 'gone' is not a state"),
        ({"priority": None}, "priority: cannot be null"),
        ({"custom": {"bad key": 1}}, "custom.bad key: custom keys use only"),
        ([], "body: expected a JSON object"),
    ],
)
async def test_bad_patches(store: SQLStore, world: World, patch: Any, message: str) -> None:
    image = await store.create_conversation(world.home.id, {}, None)
    before = await dump(store)
    with pytest.raises(ValidationError) as info:
        await store.update_conversation(world.home.id, image.id, patch, None)
    assert str(info.value).startswith(message)
    assert await dump(store) == before


async def test_bad_create_bodies(store: SQLStore, world: World) -> None:
    before = await dump(store)
    for body, message in (
        ({"tags": "vip"}, "tags: expected an array"),
        ({"created_at": "2024-01-01"}, "created_at: is set by the server"),
        ({"assignee_id": 0}, "assignee_id: expected a positive integer"),
    ):
        with pytest.raises(ValidationError, match=f"^{message}"):
            await store.create_conversation(world.home.id, body, None)
    with pytest.raises(ValidationError, match=r"^author_id"):
        await store.create_conversation(world.home.id, {}, "me")  # type: ignore[arg-type]
    assert await dump(store) == before


async def test_concurrent_patches_without_if_match_lose_nothing(
    store: SQLStore, world: World
) -> None:
    image = await store.create_conversation(world.home.id, {}, None)
    await asyncio.gather(
        *(
            store.update_conversation(world.home.id, image.id, {"custom": {f"k{i}": i}}, None)
            for i in range(30)
        )
    )
    final = await store.get_conversation(world.home.id, image.id)
    assert final.version == 31
    assert final.custom == {f"k{i}": i for i in range(30)}


async def test_concurrent_if_match_lets_exactly_one_win(store: SQLStore, world: World) -> None:
    image = await store.create_conversation(world.home.id, {}, None)
    results = await asyncio.gather(
        *(
            store.update_conversation(world.home.id, image.id, {"channel": f"c{i}"}, 1)
            for i in range(10)
        ),
        return_exceptions=True,
    )
    assert sum(not isinstance(r, BaseException) for r in results) == 1
    assert all(isinstance(r, PreconditionFailed) for r in results if isinstance(r, BaseException))
    assert (await store.get_conversation(world.home.id, image.id)).version == 2


# -- views ---------------------------------------------------------------------------------------


async def test_create_view(store: SQLStore, world: World) -> None:
    ann = world.home.people[0]
    view = await store.create_view(world.home.id, "VIP", VIP, "custom.plan", ann.id)
    assert (
        view.name,
        view.filter,
        view.group_by,
        view.owner_id,
        view.position,
        view.version,
        view.workspace_id,
    ) == ("VIP", VIP, "custom.plan", ann.id, len(FOLDERS), 1, world.home.id)
    assert await store.get_view(world.home.id, view.id) == view
    shared = await store.create_view(world.home.id, "Tags", OPEN, "tags", None)
    assert shared.position == len(FOLDERS) + 1 and shared.owner_id is None
    assert (await store.list_views(world.home.id))[-2:] == [view, shared]


async def test_a_view_keeps_its_own_copy_of_the_filter(store: SQLStore, world: World) -> None:
    raw = {"field": "state", "operator": "=", "value": "open"}
    view = await store.create_view(world.home.id, "v", raw, None, None)
    raw["value"] = "closed"
    assert view.filter["value"] == "open"
    assert (await store.get_view(world.home.id, view.id)).filter["value"] == "open"


@pytest.mark.parametrize(
    "name, filter, group_by, error, message",
    [
        ("", OPEN, None, ValidationError, "name: must not be empty"),
        ("x" * 201, OPEN, None, ValidationError, "name: longer than 200 characters"),
        (7, OPEN, None, ValidationError, "name: expected a string"),
        (
            "v",
            {
                "operator": "AND",
                "value": [OPEN, {"field": "state", "operator": "between", "value": 1}],
            },
            None,
            ValidationError,
            "filter.value[1].operator: 'between' is not an operator",
        ),
        ("v", [], None, ValidationError, "filter: expected a filter object"),
        ("v", {"field": "state", "operator": "="}, None, ValidationError, "filter: '=' needs"),
        (
            "v",
            {"field": "nope", "operator": "is null"},
            None,
            ValidationError,
            "filter.field: 'nope' is not a field",
        ),
        (
            "v",
            {"operator": "NOT", "value": {"field": "assignee_id", "operator": "=", "value": "$me"}},
            None,
            ValidationError,
            "filter.value.value: $me is not allowed under NOT",
        ),
        (
            "v",
            {"operator": "AND", "value": [OPEN] * 101},
            None,
            LimitExceeded,
            "filter.value[100]: more than 100 conditions",
        ),
        ("v", OPEN, "created_at", ValidationError, "group_by: 'created_at' cannot group a view"),
        ("v", OPEN, "nope", ValidationError, "group_by: 'nope' cannot group a view"),
        ("v", OPEN, "custom.", ValidationError, "group_by: custom keys have 1 to 64"),
        ("v", OPEN, "custom.a-b", ValidationError, "group_by: custom keys use only"),
        ("v", OPEN, 5, ValidationError, "group_by: expected a field name or null"),
    ],
)
async def test_bad_views(
    store: SQLStore,
    world: World,
    name: Any,
    filter: Any,
    group_by: Any,
    error: type[Exception],
    message: str,
) -> None:
    before = await dump(store)
    with pytest.raises(error) as info:
        await store.create_view(world.home.id, name, filter, group_by, None)
    assert type(info.value) is error
    assert str(info.value).startswith(message), str(info.value)
    folder = (await store.list_views(world.home.id))[0]
    with pytest.raises(error) as info:
        await store.update_view(world.home.id, folder.id, name, filter, group_by, None)
    assert str(info.value).startswith(message)
    assert await dump(store) == before


async def test_deep_filter_limit_is_reported_with_its_path(
    store: SQLStore, world: World
) -> None:
    deep: dict[str, Any] = OPEN
    for _ in range(8):
        deep = {"operator": "AND", "value": [deep]}
    with pytest.raises(LimitExceeded, match=r"^filter\.value\[0\]\..*nesting deeper than 8"):
        await store.create_view(world.home.id, "deep", deep, None, None)


async def test_view_owner_must_be_a_teammate_of_the_workspace(
    store: SQLStore, world: World
) -> None:
    stranger = world.away.people[0].id
    before = await dump(store)
    with pytest.raises(ValidationError, match=f"^owner_id: no teammate {stranger} in this"):
        await store.create_view(world.home.id, "v", OPEN, None, stranger)
    with pytest.raises(ValidationError, match=r"^owner_id: expected a teammate id"):
        await store.create_view(world.home.id, "v", OPEN, None, "1")  # type: ignore[arg-type]
    with pytest.raises(NotFound):
        await store.create_view(999, "v", OPEN, None, None)
    assert await dump(store) == before


async def test_update_view(store: SQLStore, world: World) -> None:
    view = await store.create_view(world.home.id, "v", OPEN, None, world.home.people[0].id)
    updated = await store.update_view(world.home.id, view.id, "renamed", VIP, "team_id", None)
    assert (
        updated.name,
        updated.filter,
        updated.group_by,
        updated.position,
        updated.version,
        updated.owner_id,
    ) == ("renamed", VIP, "team_id", view.position, 2, view.owner_id)
    assert await store.get_view(world.home.id, view.id) == updated
    moved = await store.update_view(world.home.id, view.id, "renamed", VIP, None, 0)
    assert (moved.position, moved.version, moved.group_by) == (0, 3, None)
    listed = await store.list_views(world.home.id)
    # ordered by position, then id: the seeded "Your inbox" (position 0) comes first
    assert [v.id for v in listed[:2]] == [listed[0].id, view.id]
    assert listed[0].name == "Your inbox"
    assert [v.position for v in listed] == sorted(v.position for v in listed)
    for position in (-1, True, "1", 2**31):
        with pytest.raises(ValidationError, match=r"^position: "):
            await store.update_view(world.home.id, view.id, "v", OPEN, None, position)  # type: ignore[arg-type]


async def test_views_of_another_workspace_are_not_found(store: SQLStore, world: World) -> None:
    theirs = (await store.list_views(world.away.id))[0]
    before = await dump(store)
    for view_id in (theirs.id, 10_000, 0, "1"):
        with pytest.raises(NotFound) as info:
            await store.get_view(world.home.id, view_id)  # type: ignore[arg-type]
        assert info.value.message == f"view {view_id} not found"
        with pytest.raises(NotFound):
            await store.update_view(world.home.id, view_id, "x", OPEN, None, None)  # type: ignore[arg-type]
        with pytest.raises(NotFound):
            await store.delete_view(world.home.id, view_id)  # type: ignore[arg-type]
    assert await dump(store) == before
    with pytest.raises(NotFound):
        await store.list_views(999)


async def test_delete_view(store: SQLStore, world: World) -> None:
    view = await store.create_view(world.home.id, "v", OPEN, None, None)
    await store.delete_view(world.home.id, view.id)
    with pytest.raises(NotFound):
        await store.get_view(world.home.id, view.id)
    with pytest.raises(NotFound):
        await store.delete_view(world.home.id, view.id)
    assert view.id not in [v.id for v in await store.list_views(world.home.id)]


async def test_at_most_1000_views_per_workspace(store: SQLStore, world: World) -> None:
    seeded = len(await store.list_views(world.home.id))
    made = await asyncio.gather(
        *(
            store.create_view(world.home.id, f"v{i}", OPEN, None, None)
            for i in range(MAX_VIEWS - seeded)
        )
    )
    assert sorted(v.position for v in made) == list(range(seeded, MAX_VIEWS))
    before = await dump(store)
    with pytest.raises(LimitExceeded) as info:
        await store.create_view(world.home.id, "one too many", OPEN, None, None)
    assert info.value.message == "at most 1000 views per workspace"
    assert await dump(store) == before
    # the limit is per workspace, and deleting makes room again
    await store.create_view(world.away.id, "fine", OPEN, None, None)
    await store.delete_view(world.home.id, made[0].id)
    again = await store.create_view(world.home.id, "room", OPEN, None, None)
    assert again.position == MAX_VIEWS


# -- list_conversations and recount (SQL in store/queries.py) ------------------------------------


def folder(views: list[View], name: str) -> View:
    return next(v for v in views if v.name == name)


async def test_list_conversations_pages_through_a_view(store: SQLStore, world: World) -> None:
    ann = world.home.people[0]
    made = [
        await store.create_conversation(world.home.id, {"assignee_id": ann.id}, None)
        for _ in range(7)
    ]
    await store.update_conversation(world.home.id, made[3].id, {"state": "closed"}, None)
    await store.create_conversation(world.away.id, {}, None)
    expected = [c.id for c in made if c.id != made[3].id]
    inbox = folder(await store.list_views(world.home.id), "Your inbox")
    seen: list[int] = []
    cursor = None
    for _ in range(10):
        page = await store.list_conversations(inbox, ann.id, None, 2, cursor, now_us())
        assert len(page.conversations) <= 2
        seen += [c.id for c in page.conversations]
        cursor = page.next_cursor
        if cursor is None:
            break
    assert sorted(seen) == sorted(expected)
    assert len(seen) == len(set(seen))
    bob_page = await store.list_conversations(
        inbox, world.home.people[1].id, None, 50, None, now_us()
    )
    assert bob_page.conversations == [] and bob_page.next_cursor is None
    listed = await store.list_conversations(inbox, ann.id, None, 50, None, now_us())
    assert {c.id: c for c in listed.conversations} == {
        c.id: await store.get_conversation(world.home.id, c.id) for c in listed.conversations
    }


async def test_list_conversations_rejects_a_bad_cursor(store: SQLStore, world: World) -> None:
    everything = folder(await store.list_views(world.home.id), "All")
    with pytest.raises(ValidationError):
        await store.list_conversations(
            everything, world.home.people[0].id, None, 10, "not a cursor", now_us()
        )


async def test_recount(store: SQLStore, world: World) -> None:
    team = world.home.team.id
    for body in ({}, {"team_id": team}, {"team_id": team}, {"state": "closed"}):
        await store.create_conversation(world.home.id, body, None)
    await store.create_conversation(world.away.id, {}, None)
    views = await store.list_views(world.home.id)
    everything, inboxes = folder(views, "All"), folder(views, "Team inboxes")
    recount = await store.recount(world.home.id, [everything, inboxes], now_us())
    assert recount.position == await store.outbox_position()
    assert recount.counts.get((everything.id, None, None)) == 3
    assert recount.counts.get((inboxes.id, str(team), None)) == 2


# -- encoding round trip -------------------------------------------------------------------------


async def test_views_and_images_survive_a_json_round_trip(store: SQLStore, world: World) -> None:
    view = await store.create_view(world.home.id, "v", VIP, None, None)
    assert msgspec.json.decode(msgspec.json.encode(view), type=View) == view


async def test_a_second_connection_sees_committed_writes(
    store: SQLStore, world: World, db_url: str
) -> None:
    image = await store.create_conversation(world.home.id, {}, None)
    with other_connection(db_url) as conn:
        cursor = conn.cursor()
        cursor.execute(f"SELECT version FROM conversations WHERE id = {image.id}")
        assert cursor.fetchone() == (1,)


async def test_a_lost_race_is_retried_once_then_a_conflict(
    store: SQLStore, world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SQLite's single writer never loses the version check, nor does PostgreSQL's writer
    (it locks the row first); were it lost anyway, the store must re-read and retry, or give
    up cleanly."""
    from livecount.store import rows

    image = await store.create_conversation(world.home.id, {}, None)
    real = rows.update_image
    attempts: list[int] = []

    def lose_first(conn: Connection, before: Any, after: Any) -> bool:
        attempts.append(before.version)
        return len(attempts) > 1 and real(conn, before, after)

    monkeypatch.setattr(rows, "update_image", lose_first)
    patched = await store.update_conversation(world.home.id, image.id, {"priority": True}, None)
    assert attempts == [1, 1] and patched.version == 2
    assert await store.get_conversation(world.home.id, image.id) == patched

    monkeypatch.setattr(rows, "update_image", lambda conn, before, after: False)
    before = await dump(store)
    with pytest.raises(Conflict, match="changed concurrently"):
        await store.update_conversation(world.home.id, image.id, {"priority": False}, None)
    assert await dump(store) == before


async def test_a_cancelled_call_does_not_stop_close_from_joining(db_url: str) -> None:
    before = threading.active_count()
    store = open_store(db_url)
    await store.open()
    workspace = await store.create_workspace("w")
    calls = [asyncio.ensure_future(store.snapshot(workspace.id)) for _ in range(10)]
    await asyncio.sleep(0)
    for call in calls:
        call.cancel()
    await store.close()
    await asyncio.gather(*calls, return_exceptions=True)
    assert threading.active_count() == before
