"""The embedded store: :class:`SQLStore` on one SQLite file (WAL mode).

Only files are accepted. The writer thread and the two reader threads each hold their own
connection, and ``:memory:`` gives every connection a separate, empty database, so an
in-memory URL would silently split the store in three. WAL lets the readers keep a consistent
snapshot while the writer commits.
"""

from __future__ import annotations

from typing import Any, Final

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.pool import QueuePool

from ..exceptions import ValidationError
from .sqlstore import WRITE_OPTION, SQLStore

__all__ = ["PRAGMAS", "SQLiteStore"]

PRAGMAS: Final = (
    "PRAGMA journal_mode=WAL",
    "PRAGMA synchronous=NORMAL",  # durable at checkpoints; never corrupt (WAL)
    "PRAGMA busy_timeout=5000",
    "PRAGMA foreign_keys=ON",
)
#: One writer thread + two reader threads, one connection each, and never more.
_POOL_SIZE: Final = 3


class SQLiteStore(SQLStore):
    """``sqlite:///relative/path.db`` or ``sqlite:////absolute/path.db``."""

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
        super().__init__(url)

    def _create_engine(self) -> Engine:
        engine = sa.create_engine(self.url, poolclass=QueuePool, pool_size=_POOL_SIZE,
                                  max_overflow=0, pool_timeout=30)
        event.listen(engine, "connect", _configure)
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
            cursor.execute(pragma)
    finally:
        cursor.close()
    from ..filters.sql import register_sqlite_functions  # late: written alongside

    register_sqlite_functions(dbapi_connection)


def _begin(conn: Connection) -> None:
    """BEGIN for readers (a snapshot from the first read on); BEGIN IMMEDIATE for the writer,
    which takes the write lock up front instead of failing to upgrade a read lock later."""
    write = conn.get_execution_options().get(WRITE_OPTION, False)
    conn.exec_driver_sql("BEGIN IMMEDIATE" if write else "BEGIN")
