"""The embedded store: :class:`SQLStore` on one SQLite file (WAL mode).

Only files are accepted. The writer thread and the two reader threads each hold their own
connection, and ``:memory:`` gives every connection a separate, empty database, so an
in-memory URL would silently split the store in three. WAL lets the readers keep a consistent
snapshot while the writer commits.
"""

from __future__ import annotations

import sqlite3
import time
from typing import Any, Final

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.pool import QueuePool

from ..exceptions import ValidationError
from .sqlstore import WRITE_OPTION, SQLStore

__all__ = ["BUSY_TIMEOUT_PARAM", "DEFAULT_BUSY_TIMEOUT_MS", "PRAGMAS", "SQLiteStore"]

PRAGMAS: Final = (
    "PRAGMA busy_timeout=5000",  # first: the others may wait for a lock
    "PRAGMA journal_mode=WAL",
    "PRAGMA synchronous=NORMAL",  # durable at checkpoints; never corrupt (WAL)
    "PRAGMA foreign_keys=ON",
)
#: How long a new connection retries a setting SQLite refused as busy.
_PRAGMA_RETRY: Final = 5.0
#: One writer thread + two reader threads + the relay's reader, one connection each, and
#: never more.
_POOL_SIZE: Final = 4
#: The store URL's query parameter that overrides PRAGMA busy_timeout (milliseconds).
BUSY_TIMEOUT_PARAM: Final = "busy_timeout_ms"
DEFAULT_BUSY_TIMEOUT_MS: Final = 5000
_MAX_BUSY_TIMEOUT_MS: Final = 600_000


def _busy_timeout_ms(raw: str | tuple[str, ...] | None) -> int:
    if raw is None:
        return DEFAULT_BUSY_TIMEOUT_MS
    text = raw if isinstance(raw, str) else raw[-1]
    if not text.isascii() or not text.isdigit() or int(text) > _MAX_BUSY_TIMEOUT_MS:
        raise ValidationError(f"{BUSY_TIMEOUT_PARAM} must be an integer from 0 to "
                              f"{_MAX_BUSY_TIMEOUT_MS} (milliseconds)")
    return int(text)


class SQLiteStore(SQLStore):
    """``sqlite:///relative/path.db`` or ``sqlite:////absolute/path.db``.

    ``?busy_timeout_ms=N`` (0 to 600000; default 5000) sets how long a connection waits for
    a lock another process holds before it gives up with "database is locked" (which the
    API answers 503 with ``Retry-After``). The parameter is the store's: it is taken out of
    the URL before SQLAlchemy sees it.
    """

    def __init__(self, url: str) -> None:
        try:
            parsed = sa.make_url(url)
        except sa.exc.ArgumentError:
            raise ValidationError("expected a URL like sqlite:///path/to/file.db") from None
        if parsed.get_backend_name() != "sqlite":
            raise ValidationError("expected a URL like sqlite:///path/to/file.db")
        database = parsed.database or ""
        in_memory = (database in ("", ":memory:") or database.startswith("file::memory:")
                     or parsed.query.get("mode") == "memory")
        if in_memory:
            raise ValidationError(
                "in-memory SQLite is not supported: the store's writer and reader threads use "
                "separate connections, which must share one database file; "
                "use sqlite:///path/to/file.db")
        self.busy_timeout_ms = _busy_timeout_ms(parsed.query.get(BUSY_TIMEOUT_PARAM))
        self._engine_url = parsed.difference_update_query([BUSY_TIMEOUT_PARAM])
        super().__init__(url)

    def _create_engine(self) -> Engine:
        engine = sa.create_engine(self._engine_url, poolclass=QueuePool, pool_size=_POOL_SIZE,
                                  max_overflow=0, pool_timeout=30)
        event.listen(engine, "connect", _configure)
        if self.busy_timeout_ms != DEFAULT_BUSY_TIMEOUT_MS:
            pragma = f"PRAGMA busy_timeout={self.busy_timeout_ms}"

            def busy_timeout(dbapi_connection: Any, _record: Any) -> None:
                dbapi_connection.execute(pragma)  # after _configure's PRAGMAS: it wins

            event.listen(engine, "connect", busy_timeout)
        event.listen(engine, "begin", _begin)
        return engine


def _configure(dbapi_connection: Any, _record: Any) -> None:
    """Set up each new connection.

    ``isolation_level = None`` stops pysqlite from issuing BEGIN itself (it would skip it
    before SELECTs, so a read "transaction" would see several snapshots); :func:`_begin`
    issues it instead. This is SQLAlchemy's documented recipe for SQLite transactions.
    """
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    try:
        for pragma in PRAGMAS:
            _retrying(cursor, pragma)
    finally:
        cursor.close()
    from ..filters.sql import register_sqlite_functions  # late: written alongside

    register_sqlite_functions(dbapi_connection)


def _retrying(cursor: Any, pragma: str) -> None:
    """Run ``pragma``, again while SQLite says the database is busy. Switching a fresh file
    to WAL needs its exclusive lock, and SQLite answers a connection that would deadlock
    waiting for it (several processes opening the same new file at once) with an immediate
    "database is locked" rather than through the busy timeout."""
    deadline = time.monotonic() + _PRAGMA_RETRY
    delay = 0.005
    while True:
        try:
            cursor.execute(pragma)
            return
        except sqlite3.OperationalError as exc:
            text = str(exc)
            if ("locked" not in text and "busy" not in text) or time.monotonic() > deadline:
                raise
            time.sleep(delay)
            delay = min(delay * 2, 0.1)


def _begin(conn: Connection) -> None:
    """BEGIN for readers (a snapshot from the first read on); BEGIN IMMEDIATE for the writer,
    which takes the write lock up front instead of failing to upgrade a read lock later."""
    write = conn.get_execution_options().get(WRITE_OPTION, False)
    conn.exec_driver_sql("BEGIN IMMEDIATE" if write else "BEGIN")
