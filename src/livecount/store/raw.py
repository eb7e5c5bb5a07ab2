"""The hot write path's statements on the bare DB-API cursor: conversation writes.

Creating and patching conversations is nearly every write a store takes, and each one runs the
same handful of statements. Through SQLAlchemy Core each statement costs more than the
database does (building the expression, its cache key, the compiled-cache lookup, the result
wrapping: ~30-60 µs against ~5 µs for SQLite to run it), and a PATCH ran about ten. So
these statements are written once per dialect as SQL text over the same schema
(:mod:`~livecount.store.schema`) and run on the DB-API cursor of the writer's connection, in
a transaction the store opens on that same connection (see
:meth:`~livecount.store.sqlstore.SQLStore._run_group`). The rows, the outbox entries and
every check are the same as on the SQLAlchemy path, which still serves every other write and
read (the outbox read, one statement, also runs on a bare cursor: see
:meth:`~livecount.store.sqlstore.SQLStore.read_outbox`); tests compare the two paths
(``tests/store/test_raw.py``, ``tests/store/test_group_commit.py``).

:class:`RawTx` is what the store's conversation-write code receives as its ``conn`` on this
path; :mod:`~livecount.store.rows` and :class:`~livecount.store.sqlstore.SQLStore` dispatch on
it, so the write logic itself (validation, If-Match, the optimistic version check, the outbox
append) is one piece of code for both paths.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Sequence
from typing import Any, Final, Literal

from msgspec.structs import astuple

from ..domain import MAX_SAFE_INTEGER, CustomValue, Image
from ..exceptions import StoreError
from .schema import conversations, outbox

__all__ = ["RawTx", "SQLText"]

_COLUMN_NAMES: Final = ("id", "workspace_id", "version", "state", "assignee_id", "team_id",
                        "author_id", "priority", "channel", "created_at", "updated_at",
                        "waiting_since", "snoozed_until")
assert set(_COLUMN_NAMES) == {c.name for c in conversations.c}
#: Image fields stored in ``conversations`` (all but ``id``), in column order.
SCALARS: Final = _COLUMN_NAMES[1:]
_PEOPLE: Final = ("mentions", "unread_by")
_FIELD_INDEX: Final = {name: i for i, name in enumerate(Image.__struct_fields__)}
#: (column, its index in an image's fields) of the columns an update may change
_SCALAR_INDEX: Final = tuple((name, _FIELD_INDEX[name]) for name in SCALARS
                             if name != "version")
_EMPTY: Final[frozenset[Any]] = frozenset()
#: The outbox columns an append writes (the id comes from the table), in the order
#: :meth:`RawTx.insert_outbox` takes them.
_APPENDED: Final = ("workspace_id", "kind", "entity_id", "version", "before", "after",
                    "committed_at")
assert set(_APPENDED) == {c.name for c in outbox.c} - {"id"}
#: Side-table kinds in the combined side-row query (2: custom).
_TAG, _PERSON = 0, 1


class SQLText:
    """The statements of one dialect (``?`` placeholders for sqlite3, ``%s`` for psycopg)."""

    def __init__(self, dialect: Literal["sqlite", "postgresql"]) -> None:
        self.dialect = dialect
        postgres = dialect == "postgresql"
        self.mark = "%s" if postgres else "?"
        columns = ", ".join(_COLUMN_NAMES)
        lock = " FOR UPDATE" if postgres else ""
        self.begin = None if postgres else "BEGIN IMMEDIATE"
        self.load_row = self._q(f"SELECT {columns} FROM conversations "
                                f"WHERE id = ? AND workspace_id = ?{lock}")
        # One round trip for the three side tables; ORDER BY gives the order the Core path
        # loads them in (a custom map's keys in key order).
        self.load_sides = self._q(
            "SELECT 0, tag, CAST(NULL AS BIGINT), CAST(NULL AS TEXT), "
            "CAST(NULL AS DOUBLE PRECISION), CAST(NULL AS BOOLEAN) "
            "FROM conversation_tags WHERE conversation_id = ? "
            "UNION ALL SELECT 1, field, teammate_id, NULL, NULL, NULL "
            "FROM conversation_people WHERE conversation_id = ? "
            "UNION ALL SELECT 2, key, NULL, text_value, num_value, bool_value "
            "FROM conversation_custom WHERE conversation_id = ? ORDER BY 1, 2, 3")
        self.workspace = self._q("SELECT id, name FROM workspaces WHERE id = ?")
        self.max_id = "SELECT MAX(id) FROM conversations"
        self.next_id = "SELECT nextval(pg_get_serial_sequence('conversations', 'id'))"
        self.insert_row = self._q(f"INSERT INTO conversations ({columns}) "
                                  f"VALUES ({', '.join('?' * len(_COLUMN_NAMES))})")
        self.insert_tag = self._q("INSERT INTO conversation_tags (conversation_id, tag) "
                                  "VALUES (?, ?)")
        self.insert_person = self._q("INSERT INTO conversation_people (conversation_id, "
                                     "field, teammate_id) VALUES (?, ?, ?)")
        self.insert_custom = self._q("INSERT INTO conversation_custom (conversation_id, key, "
                                     "text_value, num_value, bool_value) VALUES (?, ?, ?, ?, ?)")
        self.delete_tags = self._q("DELETE FROM conversation_tags WHERE conversation_id = ?")
        self.delete_people = self._q("DELETE FROM conversation_people "
                                     "WHERE conversation_id = ? AND field = ?")
        self.delete_custom = self._q("DELETE FROM conversation_custom "
                                     "WHERE conversation_id = ?")
        returning = " RETURNING id" if postgres else ""
        self.insert_outbox = self._q(
            f"INSERT INTO outbox ({', '.join(_APPENDED)}) "
            f"VALUES ({', '.join('?' * len(_APPENDED))}){returning}")
        outbox_columns = ", ".join(f'"{c.name}"' for c in outbox.c)
        self.read_outbox = self._q(f"SELECT {outbox_columns} FROM outbox WHERE id > ? "
                                   "ORDER BY id LIMIT ?")
        self.lock_rows = "SELECT id FROM conversations WHERE id = ANY(%s) ORDER BY id FOR UPDATE"
        self._updates: dict[tuple[str, ...], str] = {}
        self._inserts: dict[int, str] = {}
        self._missing: dict[tuple[str, int], str] = {}

    def _q(self, text: str) -> str:
        return text.replace("?", self.mark)

    def insert_outbox_rows(self, count: int) -> str:
        """PostgreSQL: insert ``count`` outbox rows in one statement, returning their ids
        (cached per count; a group commit appends at most a few dozen)."""
        found = self._inserts.get(count)
        if found is None:
            row = f"({', '.join(['%s'] * len(_APPENDED))})"
            found = self._inserts[count] = (
                f"INSERT INTO outbox ({', '.join(_APPENDED)}) "
                f"VALUES {', '.join([row] * count)} RETURNING id")
        return found

    def update(self, names: tuple[str, ...]) -> str:
        """``UPDATE conversations SET <names> WHERE id = ? AND version = ?`` (cached)."""
        found = self._updates.get(names)
        if found is None:
            sets = ", ".join(f"{name} = ?" for name in names)
            found = self._updates[names] = self._q(
                f"UPDATE conversations SET {sets} WHERE id = ? AND version = ?")
        return found

    def missing(self, table: str, count: int) -> str:
        """The ids among ``count`` given ones that ``table`` holds for a workspace."""
        key = (table, count if self.dialect == "sqlite" else 0)
        found = self._missing.get(key)
        if found is None:
            if self.dialect == "postgresql":
                where = "id = ANY(%s)"
            else:
                where = f"id IN ({', '.join('?' * count)})"
            assert table in ("teammates", "teams")
            found = self._missing[key] = self._q(
                f"SELECT id FROM {table} WHERE workspace_id = ? AND ") + where
        return found


def stored_number(value: float) -> int | float:
    """A custom number as stored (a REAL), back as :func:`~livecount.domain.canonical_custom`
    left it: integral values within ±2**53 become ints; past that they stay floats
    ("1e+20" groups)."""
    return int(value) if value.is_integer() and abs(value) <= MAX_SAFE_INTEGER else value


class RawTx:
    """One write transaction on a DB-API connection, with the statements of its dialect.

    The store opens and ends the transaction (``begin``/``commit``/``rollback``); this class
    runs the statements of conversation writes inside it and counts those that change
    something (:attr:`changes`), so a group commit knows whether a refused write left
    anything behind.
    """

    def __init__(self, connection: Any, sql: SQLText, *, defer_appends: bool = False) -> None:
        self.connection = connection
        self.sql = sql
        self.cursor = connection.cursor()
        self.postgres = sql.dialect == "postgresql"
        #: whether this transaction holds the outbox lock (PostgreSQL; see
        #: :meth:`~livecount.store.postgres.PostgresStore._before_outbox_insert`)
        self.outbox_locked = False
        #: outbox rows held back until :meth:`flush_appends` (None: appended at once); each
        #: append meanwhile answers a placeholder position, -1 for the first, -2 ...
        self.deferred: list[tuple[Any, ...]] | None = [] if defer_appends else None
        #: statements run so far that changed something (rows, locks, notifications): a
        #: write refused before any of its own can be answered alone, with nothing to undo
        self.changes = 0

    # -- transaction control ---------------------------------------------------------------

    def begin(self) -> None:
        if self.sql.begin is not None:
            self.cursor.execute(self.sql.begin)
        # psycopg opens the transaction with the first statement by itself

    def commit(self) -> None:
        self.connection.commit()

    def rollback(self) -> None:
        self.connection.rollback()

    def close(self) -> None:
        """Release the cursor (sqlite3 keeps a closed database's files open while a cursor
        still holds a statement, e.g. one referenced from an exception's traceback)."""
        with contextlib.suppress(Exception):
            self.cursor.close()

    # -- statements ------------------------------------------------------------------------

    def execute(self, statement: str, params: Sequence[Any] = ()) -> Any:
        """Run a statement that may change something (counted in :attr:`changes`)."""
        self.changes += 1
        self.cursor.execute(statement, params)
        return self.cursor

    def scalar(self, statement: str, params: Sequence[Any] = ()) -> Any:
        self.cursor.execute(statement, params)
        row = self.cursor.fetchone()
        return None if row is None else row[0]

    def lock_conversations(self, ids: Iterable[int]) -> None:
        """PostgreSQL: lock these conversations' rows, in id order, in one statement."""
        wanted = sorted({i for i in ids if isinstance(i, int) and 0 < i < 2**63})
        if wanted:
            self.cursor.execute(self.sql.lock_rows, (wanted,))

    def workspace(self, workspace_id: int) -> tuple[int, str] | None:
        self.cursor.execute(self.sql.workspace, (workspace_id,))
        row = self.cursor.fetchone()
        return None if row is None else (row[0], row[1])

    def missing(self, table: str, workspace_id: int, ids: set[int]) -> set[int]:
        ordered = sorted(ids)
        if self.postgres:
            self.cursor.execute(self.sql.missing(table, 0), (workspace_id, ordered))
        else:
            self.cursor.execute(self.sql.missing(table, len(ordered)), (workspace_id, *ordered))
        return ids - {row[0] for row in self.cursor.fetchall()}

    def next_conversation_id(self) -> int:
        if self.postgres:
            return int(self.scalar(self.sql.next_id))
        return int(self.scalar(self.sql.max_id) or 0) + 1

    def load_conversation(self, workspace_id: int, conversation_id: int) -> Image | None:
        """The conversation's image (its row locked FOR UPDATE on PostgreSQL), or None."""
        cursor = self.cursor
        cursor.execute(self.sql.load_row, (conversation_id, workspace_id))
        row = cursor.fetchone()
        if row is None:
            return None
        cursor.execute(self.sql.load_sides, (conversation_id, conversation_id, conversation_id))
        tags: list[str] = []
        mentions: list[int] = []
        unread_by: list[int] = []
        custom: dict[str, CustomValue] = {}
        for kind, name, teammate, text, number, flag in cursor.fetchall():
            if kind == _TAG:
                tags.append(name)
            elif kind == _PERSON:
                if name == "mentions":
                    mentions.append(teammate)
                elif name == "unread_by":
                    unread_by.append(teammate)
            elif text is not None:
                custom[name] = text
            elif flag is not None:
                custom[name] = bool(flag)
            else:
                custom[name] = stored_number(number)
        (cid, ws, version, state, assignee, team, author, priority, channel, created, updated,
         waiting, snoozed) = row
        return Image(cid, ws, version, state, assignee, team, author, bool(priority), channel,
                     frozenset(tags) if tags else _EMPTY,
                     frozenset(mentions) if mentions else _EMPTY,
                     frozenset(unread_by) if unread_by else _EMPTY,
                     created, updated, waiting, snoozed, custom)

    def insert_image(self, image: Image) -> None:
        """A new conversation row (explicit id) and its side rows."""
        self.changes += 1
        self.cursor.execute(self.sql.insert_row,
                            (image.id, *(getattr(image, name) for name in SCALARS)))
        self._insert_sets(image, ("tags", *_PEOPLE, "custom"))

    def update_image(self, before: Image, after: Image) -> bool:
        """``after`` over ``before`` if the row is still at ``before.version`` (else False);
        side rows rewritten only for the sets that changed (as ``rows.update_image``)."""
        old, new = astuple(before), astuple(after)
        names = (*(name for name, i in _SCALAR_INDEX if new[i] != old[i]), "version")
        self.cursor.execute(self.sql.update(names),
                            (*(new[_FIELD_INDEX[name]] for name in names), after.id,
                             before.version))
        if self.cursor.rowcount != 1:
            return False
        self.changes += 1
        changed = [field for field in ("tags", *_PEOPLE, "custom")
                   if getattr(after, field) != getattr(before, field)]
        for field in changed:
            if field == "tags":
                self.cursor.execute(self.sql.delete_tags, (after.id,))
            elif field == "custom":
                self.cursor.execute(self.sql.delete_custom, (after.id,))
            else:
                self.cursor.execute(self.sql.delete_people, (after.id, field))
        self._insert_sets(after, changed)
        return True

    def _insert_sets(self, image: Image, fields: Iterable[str]) -> None:
        cid = image.id
        for field in fields:
            if field == "tags" and image.tags:
                self.cursor.executemany(self.sql.insert_tag, [(cid, t) for t in image.tags])
            elif field in _PEOPLE and getattr(image, field):
                self.cursor.executemany(self.sql.insert_person,
                                        [(cid, field, t) for t in getattr(image, field)])
            elif field == "custom" and image.custom:
                self.cursor.executemany(self.sql.insert_custom,
                                        [_custom_row(cid, k, v)
                                         for k, v in image.custom.items()])

    def insert_outbox(self, workspace_id: int, kind: str, entity_id: int, version: int,
                      before: str | None, after: str | None, committed_at: int) -> int:
        """Append an outbox row; return its position (a placeholder while appends are
        deferred: see :meth:`flush_appends`)."""
        self.changes += 1
        if self.deferred is not None:
            self.deferred.append((workspace_id, kind, entity_id, version, before, after,
                                  committed_at))
            return -len(self.deferred)
        self.cursor.execute(self.sql.insert_outbox, (workspace_id, kind, entity_id, version,
                                                     before, after, committed_at))
        if self.postgres:
            row = self.cursor.fetchone()
            position = None if row is None else row[0]
        else:
            position = self.cursor.lastrowid
        if not position:
            raise StoreError("the database returned no id for a new outbox row")
        return int(position)


    def flush_appends(self) -> list[int]:
        """Insert the deferred outbox rows in one statement, in the order they were
        appended; their positions, ascending (the position of placeholder ``-k`` is item
        ``k - 1``). The caller holds the outbox lock, so the ids drawn are this statement's
        alone and increase with the rows."""
        rows, self.deferred = self.deferred or [], None
        if not rows:
            return []
        self.cursor.execute(self.sql.insert_outbox_rows(len(rows)),
                            [value for row in rows for value in row])
        positions = sorted(int(row[0]) for row in self.cursor.fetchall())
        if len(positions) != len(rows):
            raise StoreError("the database returned too few ids for new outbox rows")
        return positions


def _custom_row(cid: int, key: str, value: CustomValue) -> tuple[Any, ...]:
    if isinstance(value, bool):
        return (cid, key, None, None, value)
    if isinstance(value, str):
        return (cid, key, value, None, None)
    return (cid, key, None, float(value), None)
