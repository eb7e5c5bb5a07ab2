"""Fixtures for the store tests: a store URL per backend, an opened store, two tenants.

``db_url`` (and so ``store`` and ``world``) is parametrized over the backends, so every test
that uses it runs on SQLite and on PostgreSQL. A test that is about one backend only (its
files, its locks, its connections) says so with :data:`sqlite_only` or :data:`postgres_only`,
which override the ``backend`` parameter.

SQLite: a fresh file per test. PostgreSQL: one database per test session,
``livecount_test_<pid>``, created on first use and dropped at the end; before each test its
``public`` schema is emptied (every table's rows deleted, every sequence restarted, so ids
and positions start at 1 as on a fresh SQLite file), or dropped and recreated when a test
left it in another shape. When the server is not reachable the PostgreSQL cases skip, with
the reason; with ``CI=true`` they fail instead, as they must run there.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import psycopg
import pytest
import sqlalchemy as sa
from psycopg import sql
from sqlalchemy.engine import Connection

from livecount.store import open_store
from livecount.store.base import Team, Teammate, Workspace
from livecount.store.migrations import LATEST
from livecount.store.schema import metadata
from livecount.store.sqlstore import SQLStore

POSTGRES_ADMIN_URL = os.environ.get(
    "LIVECOUNT_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/test"
)
#: Every connection a test's store opens carries this application_name (unless the test
#: sets its own), so the reset can find and end connections a failed test leaked.
APPLICATION_NAME = "livecount_store_tests"

BACKENDS = ("sqlite", pytest.param("postgresql", marks=pytest.mark.postgres))
#: Run a test on SQLite only (it is about SQLite's file, locks or connections).
sqlite_only = pytest.mark.parametrize("backend", ["sqlite"])
#: Run a test on PostgreSQL only.
postgres_only = pytest.mark.parametrize(
    "backend", [pytest.param("postgresql", marks=pytest.mark.postgres)])


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def _unreachable(error: str) -> None:
    where = urlsplit(POSTGRES_ADMIN_URL).netloc.rpartition("@")[2]
    message = f"PostgreSQL not reachable at {where} ({error})"
    if os.environ.get("CI") == "true":
        pytest.fail(f"{message}; CI=true, so the tests that need it must run", pytrace=False)
    pytest.skip(message)


def with_database(url: str, database: str) -> str:
    parts = urlsplit(url)
    return parts._replace(path=f"/{database}").geturl()


def _admin_connect() -> psycopg.Connection[Any]:
    return psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True, connect_timeout=5)


@pytest.fixture(scope="session")
def pg_database(_postgres_error: str | None) -> Iterator[str]:
    """``postgresql://…/livecount_test_<pid>``: this session's own database, dropped at the
    end (with any connection still in it)."""
    if _postgres_error is not None:
        _unreachable(_postgres_error)
    name = f"livecount_test_{os.getpid()}"
    drop = sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
    with _admin_connect() as conn:
        conn.execute(drop)  # a previous run with the same pid that died before its cleanup
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        yield with_database(POSTGRES_ADMIN_URL, name)
    finally:
        with _admin_connect() as conn:
            conn.execute(drop)


def reset_postgres(url: str, drop: bool = False) -> None:
    """Empty the database's ``public`` schema for the next test (see the module); with
    ``drop``, drop it and make a new one (no tables at all)."""
    with psycopg.connect(url, autocommit=True, connect_timeout=5) as conn:
        conn.execute("SET lock_timeout = '3s'")
        for attempt in range(2):
            try:
                _reset(conn, drop)
                return
            except psycopg.errors.LockNotAvailable:
                if attempt:
                    raise
                # A store the last test leaked holds locks (its leak guard reported it):
                # end every other connection to this session's database.
                conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                             "WHERE datname = current_database() AND pid <> pg_backend_pid()")


def _reset(conn: psycopg.Connection[Any], drop: bool) -> None:
    tables = {name for (name,) in conn.execute(
        "SELECT tablename FROM pg_tables WHERE schemaname = 'public'")}
    wanted = {table.name for table in metadata.sorted_tables} | {"schema_version"}
    version = None
    if tables == wanted:
        version = conn.execute("SELECT MAX(version) FROM schema_version").fetchone()
    if drop or version != (LATEST,):
        conn.execute("DROP SCHEMA IF EXISTS public CASCADE")
        conn.execute("CREATE SCHEMA public")
        return
    with conn.transaction():
        for table in reversed(metadata.sorted_tables):
            conn.execute(sql.SQL("DELETE FROM {}").format(sql.Identifier(table.name)))
        for (sequence,) in conn.execute(
                "SELECT sequencename FROM pg_sequences WHERE schemaname = 'public'").fetchall():
            conn.execute(sql.SQL("ALTER SEQUENCE {} RESTART").format(sql.Identifier(sequence)))


@pytest.fixture
def db_url(backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> str:
    """A store URL on ``backend``, for an empty database."""
    if backend == "sqlite":
        return f"sqlite:///{tmp_path / 'store.db'}"
    url = request.getfixturevalue("pg_database")
    reset_postgres(url)
    return f"{url}?application_name={APPLICATION_NAME}"


@pytest.fixture
def empty_db_url(backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> str:
    """Like ``db_url``, but the database has no tables at all (not even livecount's)."""
    if backend == "sqlite":
        return f"sqlite:///{tmp_path / 'store.db'}"
    url = request.getfixturevalue("pg_database")
    reset_postgres(url, drop=True)
    return f"{url}?application_name={APPLICATION_NAME}"


@pytest.fixture
async def store(db_url: str) -> AsyncIterator[SQLStore]:
    opened = open_store(db_url)
    assert isinstance(opened, SQLStore)
    await opened.open()
    try:
        yield opened
    finally:
        await opened.close()


@contextlib.contextmanager
def other_connection(db_url: str) -> Iterator[Any]:
    """A plain DB-API connection to the store's database, apart from the store (as another
    process would have): sqlite3 or psycopg (autocommit)."""
    parsed = sa.make_url(db_url)
    if parsed.get_backend_name() == "sqlite":
        conn: Any = sqlite3.connect(parsed.database or "")
    else:
        conn = psycopg.connect(db_url, autocommit=True, connect_timeout=5)
    try:
        yield conn
    finally:
        conn.close()


@dataclass
class Tenant:
    workspace: Workspace
    people: list[Teammate]
    team: Team

    @property
    def id(self) -> int:
        return self.workspace.id


@dataclass
class World:
    """Two workspaces, each with two teammates and a team: ``home`` is the one under test,
    ``away`` supplies ids that exist but belong to another tenant."""

    home: Tenant
    away: Tenant


async def make_tenant(store: SQLStore, name: str) -> Tenant:
    workspace = await store.create_workspace(name)
    people = [
        (await store.create_teammate(workspace.id, who, f"{who}@{name}.test"))[0]
        for who in ("ann", "bob")
    ]
    team = await store.create_team(workspace.id, "support", [people[0].id])
    return Tenant(workspace, people, team)


@pytest.fixture
async def world(store: SQLStore) -> World:
    return World(home=await make_tenant(store, "home"), away=await make_tenant(store, "away"))


def dump_tables(conn: Connection) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of every table, in a stable order: compare two dumps to prove nothing moved.

    On SQLite the AUTOINCREMENT counters too. PostgreSQL's sequences are left out: a failed
    transaction may use up sequence values (by design, never rolled back); nothing reads them
    but the next insert, and a gap in ids or positions is harmless.
    """
    out: dict[str, list[tuple[Any, ...]]] = {}
    for table in metadata.sorted_tables:
        out[table.name] = [
            tuple(row)
            for row in conn.execute(sa.select(table).order_by(*table.primary_key.columns))
        ]
    if conn.dialect.name == "sqlite":
        out["sqlite_sequence"] = [
            tuple(row)
            for row in conn.execute(sa.text("SELECT name, seq FROM sqlite_sequence ORDER BY name"))
        ]
    return out


async def dump(store: SQLStore) -> dict[str, list[tuple[Any, ...]]]:
    return await store._read(dump_tables)
