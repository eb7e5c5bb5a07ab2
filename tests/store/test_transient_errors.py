"""A database that is busy (locked) or unreachable is a 503 to retry, never a 500.

The lock is real: the stdlib ``sqlite3`` module opens the store's file and holds
``BEGIN EXCLUSIVE``, as another process (a backup, a migration, ``sqlite3`` in a shell) would.
Bugs (``no such table``, integrity violations) stay :class:`StoreError`.
"""

from __future__ import annotations

import contextlib
import sqlite3
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Connection

from livecount.exceptions import StoreError, Unavailable, ValidationError
from livecount.store.sqlite import SQLiteStore
from livecount.store.sqlstore import transient_error

pytestmark = pytest.mark.anyio


@contextlib.contextmanager
def exclusive_lock(path: Path) -> Iterator[sqlite3.Connection]:
    """Hold SQLite's write lock on ``path`` from another connection until the block ends."""
    conn = sqlite3.connect(path, isolation_level=None, timeout=5)
    try:
        conn.execute("BEGIN EXCLUSIVE")
        try:
            yield conn
        finally:
            conn.execute("ROLLBACK")
    finally:
        conn.close()


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "store.db"


@pytest.fixture
async def impatient_store(db_path: Path) -> AsyncIterator[SQLiteStore]:
    """A store that waits 100 ms (not 5 s) for a lock held elsewhere."""
    store = SQLiteStore(f"sqlite:///{db_path}?busy_timeout_ms=100")
    await store.open()
    try:
        yield store
    finally:
        await store.close()


async def test_a_locked_database_is_unavailable_then_recovers(
        impatient_store: SQLiteStore, db_path: Path) -> None:
    store = impatient_store
    before = await store.list_workspaces()
    with exclusive_lock(db_path):
        started = time.monotonic()
        with pytest.raises(Unavailable) as caught:
            await store.create_workspace("Blocked")
        waited = time.monotonic() - started
        # Reads still work under WAL while another connection holds the write lock.
        assert await store.list_workspaces() == before
    error = caught.value
    assert not isinstance(error, StoreError)
    assert (error.status, error.code, error.retry_after) == (503, "unavailable", 1)
    assert error.message == "the database is busy (locked); retry shortly"
    assert isinstance(error.__cause__, sa.exc.OperationalError)
    assert 0.05 <= waited < 3, f"busy_timeout_ms=100 was not applied (waited {waited:.2f} s)"
    assert await store.list_workspaces() == before  # nothing half-written
    created = await store.create_workspace("Free again")
    assert [w.id for w in await store.list_workspaces()] == [
        *(w.id for w in before), created.id]


async def test_busy_timeout_comes_from_the_url(impatient_store: SQLiteStore) -> None:
    def busy_timeout(conn: Connection) -> object:
        return conn.exec_driver_sql("PRAGMA busy_timeout").scalar()

    assert impatient_store.busy_timeout_ms == 100
    assert await impatient_store._read(busy_timeout) == 100
    assert await impatient_store._write(busy_timeout) == 100


@pytest.mark.parametrize("value", ["-1", "abc", "1.5", "600001", "١٢"])
def test_a_bad_busy_timeout_is_refused(tmp_path: Path, value: str) -> None:
    with pytest.raises(ValidationError, match="busy_timeout_ms"):
        SQLiteStore(f"sqlite:///{tmp_path / 'x.db'}?busy_timeout_ms={value}")


async def test_bugs_stay_store_errors(impatient_store: SQLiteStore) -> None:
    def no_such_table(conn: Connection) -> None:
        conn.exec_driver_sql("SELECT * FROM no_such_table")

    def duplicate_key(conn: Connection) -> None:
        conn.exec_driver_sql("CREATE TEMP TABLE t (id INTEGER PRIMARY KEY)")
        conn.exec_driver_sql("INSERT INTO t VALUES (1), (1)")

    for bug in (no_such_table, duplicate_key):
        with pytest.raises(StoreError, match="database error") as caught:
            await impatient_store._write(bug)
        assert caught.value.status == 500
        assert not isinstance(caught.value, Unavailable)


def _sqlite_error(message: str, code: int) -> sa.exc.OperationalError:
    orig = sqlite3.OperationalError(message)
    orig.sqlite_errorcode = code
    return sa.exc.OperationalError("SELECT 1", {}, orig)


class _ServerDown(Exception):
    """Stands in for psycopg.OperationalError: a DBAPI error that is not sqlite3's."""


@pytest.mark.parametrize(("exc", "message"), [
    (_sqlite_error("database is locked", 5), "the database is busy (locked); retry shortly"),
    (_sqlite_error("database table is locked", 6), "the database is busy (locked); retry shortly"),
    (_sqlite_error("database is locked", 5 | 2 << 8), "the database is busy (locked); retry "
                                                      "shortly"),  # SQLITE_BUSY_SNAPSHOT
    (_sqlite_error("disk I/O error", 10), "the database is unavailable (disk i/o error); "
                                          "retry shortly"),
    (sa.exc.OperationalError("SELECT 1", {}, _ServerDown("server closed the connection")),
     "the database is unavailable (OperationalError); retry shortly"),
    (sa.exc.DisconnectionError("gone"), "the database connection was lost; retry shortly"),
    (sa.exc.DBAPIError("SELECT 1", {}, _ServerDown("reset"), connection_invalidated=True),
     "the database connection was lost; retry shortly"),
    (sa.exc.TimeoutError("QueuePool limit reached"),
     "the database has no free connection (pool timeout); retry shortly"),
])
def test_transient_failures_are_unavailable(exc: sa.exc.SQLAlchemyError, message: str) -> None:
    unavailable = transient_error(exc)
    assert isinstance(unavailable, Unavailable)
    assert unavailable.message == message and unavailable.retry_after == 1


@pytest.mark.parametrize("exc", [
    _sqlite_error("no such table: x", 1),
    _sqlite_error('near "SELEC": syntax error', 1),
    _sqlite_error("unable to open database file", 14),
    sa.exc.IntegrityError("INSERT", {}, sqlite3.IntegrityError("UNIQUE constraint failed")),
    sa.exc.ProgrammingError("SELECT", {}, sqlite3.ProgrammingError("closed database")),
    sa.exc.ArgumentError("bad argument"),
])
def test_bugs_are_not_transient(exc: sa.exc.SQLAlchemyError) -> None:
    assert transient_error(exc) is None
