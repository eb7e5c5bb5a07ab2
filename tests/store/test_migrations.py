"""Schema migrations: versioned, idempotent, run on every open and by ``livecount migrate``,
on both backends; safe when several processes start at once."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Connection

from livecount.exceptions import StoreError
from livecount.store import open_store
from livecount.store.migrations import LATEST, MIGRATIONS, current_version
from livecount.store.schema import metadata, schema_version, workspaces
from livecount.store.seed import FOLDERS
from livecount.store.sqlstore import SQLStore

pytestmark = pytest.mark.anyio


def engine_for(empty_db_url: str) -> sa.Engine:
    """A plain engine on the store's database (as an older livecount or a DBA would use)."""
    url = sa.make_url(empty_db_url)
    if url.get_backend_name() == "postgresql":
        url = url.set(drivername="postgresql+psycopg")
    return sa.create_engine(url, poolclass=sa.NullPool)


def versions(empty_db_url: str) -> list[tuple[Any, ...]]:
    engine = engine_for(empty_db_url)
    try:
        with engine.connect() as conn:
            return [tuple(row) for row in conn.execute(
                sa.select(schema_version.c.version, schema_version.c.description)
                .order_by(schema_version.c.version))]
    finally:
        engine.dispose()


async def open_and_close(empty_db_url: str) -> tuple[int, int] | None:
    store = open_store(empty_db_url)
    assert isinstance(store, SQLStore)
    await store.open()
    try:
        return store.schema_versions
    finally:
        await store.close()


def test_the_migrations_are_numbered_from_one() -> None:
    assert [m.version for m in MIGRATIONS] == list(range(1, len(MIGRATIONS) + 1))
    assert LATEST == MIGRATIONS[-1].version == 1


async def test_open_migrates_a_new_database_once(empty_db_url: str) -> None:
    assert await open_and_close(empty_db_url) == (0, LATEST)
    assert versions(empty_db_url) == [(m.version, m.description) for m in MIGRATIONS]
    assert await open_and_close(empty_db_url) == (LATEST, LATEST)
    assert len(versions(empty_db_url)) == LATEST


async def test_a_database_from_before_versioning_is_adopted(empty_db_url: str) -> None:
    """Tables made by an older livecount (``create_all``, no ``schema_version``): the first
    open records version 1 and keeps every row."""
    engine = engine_for(empty_db_url)
    try:
        metadata.create_all(engine)
        with engine.begin() as conn:
            conn.execute(workspaces.insert().values(name="old", created_at=1))
            assert current_version(conn) == 0
    finally:
        engine.dispose()
    store = open_store(empty_db_url)
    assert isinstance(store, SQLStore)
    await store.open()
    try:
        assert store.schema_versions == (0, LATEST)
        [old] = await store.list_workspaces()
        assert old.name == "old"
        new = await store.create_workspace("new")  # the ids go on from the old rows
        assert new.id == old.id + 1
        assert len(await store.list_views(new.id)) == len(FOLDERS)
    finally:
        await store.close()


async def test_a_newer_schema_is_refused(empty_db_url: str) -> None:
    await open_and_close(empty_db_url)
    engine = engine_for(empty_db_url)
    try:
        with engine.begin() as conn:
            conn.execute(schema_version.insert().values(
                version=LATEST + 1, description="from the future", applied_at=0))
    finally:
        engine.dispose()
    before = threading.active_count()
    store = open_store(empty_db_url)
    with pytest.raises(StoreError, match=f"schema is at version {LATEST + 1}, newer than "
                                         f"this livecount knows \\({LATEST}\\); upgrade"):
        await store.open()
    assert threading.active_count() == before
    await store.close()


async def test_a_failed_migration_changes_nothing(empty_db_url: str,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """One transaction: a step that breaks halfway leaves no table and no version row."""
    from livecount.store import migrations

    def broken(conn: Connection) -> None:
        metadata.create_all(conn)
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(migrations, "MIGRATIONS",
                        (migrations.Migration(1, "broken", broken),))
    store = open_store(empty_db_url)
    with pytest.raises(RuntimeError, match="disk on fire"):
        await store.open()
    engine = engine_for(empty_db_url)
    try:
        assert sa.inspect(engine).get_table_names() == []
    finally:
        engine.dispose()
    monkeypatch.undo()
    assert await open_and_close(empty_db_url) == (0, LATEST)


async def test_processes_starting_at_once_migrate_once(empty_db_url: str) -> None:
    results = await asyncio.gather(*(open_and_close(empty_db_url) for _ in range(4)))
    assert sorted(results) == [(0, LATEST)] + [(LATEST, LATEST)] * 3  # type: ignore[operator]
    assert len(versions(empty_db_url)) == LATEST


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "livecount", *args], capture_output=True,
                          text=True, timeout=120, env={"COLUMNS": "120", "PATH": "/usr/bin"})


def test_livecount_migrate(empty_db_url: str) -> None:
    first = run_cli("migrate", "--store", empty_db_url)
    assert first.returncode == 0, first.stderr
    assert first.stdout == f"livecount migrate: migrated the schema from version 0 to {LATEST}\n"
    again = run_cli("migrate", "--store", empty_db_url)
    assert again.returncode == 0, again.stderr
    assert again.stdout == (f"livecount migrate: the schema is at version {LATEST}, "
                            "nothing to do\n")
    assert versions(empty_db_url)[-1][0] == LATEST


def test_livecount_migrate_refuses_a_bad_url() -> None:
    for url in ("mysql://x/y", "postgresql://postgres@127.0.0.1:1/nowhere?connect_timeout=1"):
        result = run_cli("migrate", "--store", url)
        assert result.returncode == 2
        assert result.stderr.startswith("livecount: error: ")
        assert "Traceback" not in result.stderr
