"""Versioned, idempotent schema migrations, the same on SQLite and PostgreSQL.

The ``schema_version`` table (:data:`~livecount.store.schema.schema_version`) holds one row
per migration applied. :func:`migrate` brings a database from the version it records to
:data:`LATEST`, every step and its row in ONE transaction, so a failed step leaves the
database at the version before it. The caller holds the migration lock for that transaction
(:meth:`SQLStore._lock_migrations <livecount.store.sqlstore.SQLStore._lock_migrations>`: a
PostgreSQL advisory lock; on SQLite the write transaction's ``BEGIN IMMEDIATE``), so any
number of processes may start at once: one migrates, the others wait, then find nothing to do.

It runs on every :meth:`~livecount.store.sqlstore.SQLStore.open` and from ``livecount
migrate --store URL``. A database without a ``schema_version`` table is at version 0: a new
one, or one created before versioning existed (its tables are already there; migration 1
creates only what is missing and records version 1). A database at a version newer than
this code knows is refused: an older livecount must not write to a schema it does not know.

Adding a migration: append a :class:`Migration` with the next number. A step runs once per
database, but write it idempotently anyway (``IF NOT EXISTS``), and never change an old one.
Migration 1 creates the tables as :data:`~livecount.store.schema.metadata` defines them
today; when a later migration alters a table, freeze migration 1's definition of it first
(copy the table into this module), so a new database still passes through every version.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Final, NamedTuple

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from ..domain import now_us
from ..exceptions import StoreError
from .schema import metadata, schema_version

__all__ = ["LATEST", "MIGRATIONS", "Migration", "current_version", "migrate", "migrate_store"]


class Migration(NamedTuple):
    version: int
    description: str
    apply: Callable[[Connection], None]


def _initial_schema(conn: Connection) -> None:
    metadata.create_all(conn, checkfirst=True)


MIGRATIONS: Final[tuple[Migration, ...]] = (
    Migration(1, "the initial schema: workspaces, people, conversations, views, outbox",
              _initial_schema),
)
LATEST: Final = MIGRATIONS[-1].version


def current_version(conn: Connection) -> int:
    """The version the database records: 0 without a ``schema_version`` table or row."""
    if not sa.inspect(conn).has_table(schema_version.name):
        return 0
    return int(conn.scalar(sa.select(sa.func.max(schema_version.c.version))) or 0)


def migrate(conn: Connection) -> tuple[int, int]:
    """Apply every migration the database lacks, in the caller's transaction (which holds
    the migration lock); return ``(version before, version after)``."""
    schema_version.create(conn, checkfirst=True)
    before = current_version(conn)
    if before > LATEST:
        raise StoreError(f"the database schema is at version {before}, newer than this "
                         f"livecount knows ({LATEST}); upgrade livecount")
    for step in MIGRATIONS[before:]:
        step.apply(conn)
        conn.execute(schema_version.insert().values(
            version=step.version, description=step.description, applied_at=now_us()))
    return before, LATEST


async def migrate_store(url: str) -> tuple[int, int]:
    """Open the store at ``url`` (which migrates it), close it; ``(version before, after)``."""
    from . import open_store
    from .sqlstore import SQLStore

    store = open_store(url)
    if not isinstance(store, SQLStore):  # pragma: no cover - every backend is SQL today
        raise StoreError(f"{type(store).__name__} has no schema to migrate")
    await store.open()
    try:
        versions = store.schema_versions
    finally:
        await store.close()
    if versions is None:  # pragma: no cover - open() sets it or raises
        raise StoreError("the store did not report its schema version")
    return versions
