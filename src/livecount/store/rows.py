"""Images ⇄ rows: how one conversation is spread over ``conversations`` and its side tables.

Synchronous SQLAlchemy Core helpers used inside a store's transaction (and by tests that need
rows without a store). :func:`insert_image` and :func:`update_image` also take the hot path's
:class:`~livecount.store.raw.RawTx` (the same rows, written on the bare driver cursor).
"""

from __future__ import annotations

import gc
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from itertools import groupby, islice, repeat
from operator import eq, itemgetter
from sys import intern
from typing import Any, Final

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from ..domain import MAX_SAFE_INTEGER, CustomValue, Image
from .raw import SCALARS, RawTx, stored_number
from .schema import conversation_custom, conversation_people, conversation_tags, conversations

__all__ = ["delete_image", "insert_image", "load_images", "update_image"]

_PEOPLE = ("mentions", "unread_by")


def _custom_row(conversation_id: int, key: str, value: CustomValue) -> dict[str, Any]:
    row: dict[str, Any] = {"conversation_id": conversation_id, "key": key,
                           "text_value": None, "num_value": None, "bool_value": None}
    if isinstance(value, bool):
        row["bool_value"] = value
    elif isinstance(value, str):
        row["text_value"] = value
    else:
        row["num_value"] = float(value)
    return row


def _insert_sets(conn: Connection, image: Image, fields: Iterable[str]) -> None:
    cid = image.id
    for field in fields:
        if field == "tags" and image.tags:
            conn.execute(conversation_tags.insert(),
                         [{"conversation_id": cid, "tag": t} for t in image.tags])
        elif field in _PEOPLE and getattr(image, field):
            conn.execute(conversation_people.insert(),
                         [{"conversation_id": cid, "field": field, "teammate_id": t}
                          for t in getattr(image, field)])
        elif field == "custom" and image.custom:
            conn.execute(conversation_custom.insert(),
                         [_custom_row(cid, k, v) for k, v in image.custom.items()])


def insert_image(conn: Connection | RawTx, image: Image) -> None:
    """Insert a new conversation row (with its explicit id) and its side rows."""
    if not isinstance(conn, Connection):
        conn.insert_image(image)
        return
    values = {name: getattr(image, name) for name in SCALARS}
    conn.execute(conversations.insert().values(id=image.id, **values))
    _insert_sets(conn, image, ("tags", *_PEOPLE, "custom"))


def update_image(conn: Connection | RawTx, before: Image, after: Image) -> bool:
    """Write ``after`` over ``before`` if the row is still at ``before.version``.

    Returns False when another writer got there first (optimistic concurrency). Side tables
    are rewritten only for the sets that changed.
    """
    if not isinstance(conn, Connection):
        return conn.update_image(before, after)
    values = {name: getattr(after, name) for name in SCALARS
              if getattr(after, name) != getattr(before, name)}
    values["version"] = after.version
    result = conn.execute(
        conversations.update()
        .where(conversations.c.id == after.id, conversations.c.version == before.version)
        .values(**values))
    if result.rowcount != 1:
        return False
    changed = [f for f in ("tags", *_PEOPLE, "custom") if getattr(after, f) != getattr(before, f)]
    for field in changed:
        if field == "tags":
            conn.execute(conversation_tags.delete()
                         .where(conversation_tags.c.conversation_id == after.id))
        elif field == "custom":
            conn.execute(conversation_custom.delete()
                         .where(conversation_custom.c.conversation_id == after.id))
        else:
            conn.execute(conversation_people.delete()
                         .where(conversation_people.c.conversation_id == after.id,
                                conversation_people.c.field == field))
    _insert_sets(conn, after, changed)
    return True


def delete_image(conn: Connection, conversation_id: int) -> None:
    for table in (conversation_tags, conversation_people, conversation_custom):
        conn.execute(table.delete().where(table.c.conversation_id == conversation_id))
    conn.execute(conversations.delete().where(conversations.c.id == conversation_id))


#: The columns of ``conversations`` in :class:`Image` field order (the sets come between).
_COLUMNS: Final = tuple(conversations.c[name] for name in (
    "id", "workspace_id", "version", "state", "assignee_id", "team_id", "author_id", "priority",
    "channel", "created_at", "updated_at", "waiting_since", "snoozed_until"))
assert Image.__struct_fields__ == (*(c.name for c in _COLUMNS[:9]), "tags", "mentions",
                                   "unread_by", *(c.name for c in _COLUMNS[9:]), "custom")
#: Loaded ids per side-table query; a window whose ids fill at least half of their range is
#: read as one range (the primary key's order, no IN list), else by IN lists of _IN_CHUNK.
_WINDOW: Final = 50_000
_IN_CHUNK: Final = 500
#: Loads of at least this many conversations pause the garbage collector while they build
#: their (acyclic) rows, sets and images: collections triggered by millions of fresh
#: containers would otherwise walk them again and again, several times the load's own cost.
_PAUSE_GC_AT: Final = 10_000
_BUILD_CHUNK: Final = 4096
_EMPTY: Final[frozenset[Any]] = frozenset()
_FIRST: Final = itemgetter(0)
_SECOND: Final = itemgetter(1)
_THIRD: Final = itemgetter(2)
_FIRST_TWO: Final = itemgetter(0, 1)

_tc, _pc, _cc = conversation_tags.c, conversation_people.c, conversation_custom.c
#: Side-table reads per id range and per id list, ordered so one conversation's rows are
#: adjacent (and a custom map's keys come in key order, as they always did).
_SIDE: Final = {
    name: (select.where(cid.between(sa.bindparam("lo"), sa.bindparam("hi"))),
           select.where(cid.in_(sa.bindparam("ids", expanding=True))))
    for name, cid, select in (
        ("tags", _tc.conversation_id,
         sa.select(_tc.conversation_id, _tc.tag).order_by(_tc.conversation_id)),
        ("people", _pc.conversation_id,
         sa.select(_pc.conversation_id, _pc.field, _pc.teammate_id)
         .order_by(_pc.conversation_id, _pc.field)),
        ("custom", _cc.conversation_id,
         sa.select(_cc.conversation_id, _cc.key, _cc.text_value, _cc.num_value,
                   _cc.bool_value).order_by(_cc.conversation_id, _cc.key)),
    )
}


def _fetch(conn: Connection, statement: sa.Executable,
           params: dict[str, Any] | None = None) -> list[Any]:
    """All rows as the driver's plain tuples (see :func:`_fetch_chunks`)."""
    rows: list[Any] = []
    for chunk in _fetch_chunks(conn, statement, params, None):
        rows += chunk
    return rows


def _fetch_chunks(conn: Connection, statement: sa.Executable, params: dict[str, Any] | None,
                  size: int | None) -> Iterator[list[Any]]:
    """The rows in chunks of ``size`` (None: one chunk), as the driver's plain tuples: the
    statement runs through SQLAlchemy (same transaction, binds, dialect), but the rows skip
    its per-row wrapping, which costs more than the database itself for a million rows.
    Values are the driver's (a boolean may come as 0/1)."""
    result = conn.execute(statement, params or {})
    try:
        cursor = getattr(result, "cursor", None)
        if cursor is None:  # not a DBAPI cursor result: take SQLAlchemy's rows
            yield from (list(part) for part in result.tuples().partitions(size))
        elif size is None:
            yield cursor.fetchall()
        else:
            while chunk := cursor.fetchmany(size):
                yield chunk
    finally:
        result.close()


#: Batches of one side table's rows (see :func:`_side_rows`).
_Batches = Callable[[str], Iterator[list[Any]]]


def _side_rows(conn: Connection, name: str, ids: list[int]) -> Iterator[list[Any]]:
    """The rows of side table ``name`` for the conversations ``ids`` (sorted ascending), in
    batches that each hold all the rows of their conversations, one conversation's rows
    adjacent; a batch may include rows of other conversations in its id range."""
    by_range, by_list = _SIDE[name]
    sparse: list[int] = []
    for start in range(0, len(ids), _WINDOW):
        window = ids[start:start + _WINDOW]
        if window[-1] - window[0] < 2 * len(window):
            yield _fetch(conn, by_range, {"lo": window[0], "hi": window[-1]})
        else:
            sparse += window
    for start in range(0, len(sparse), _IN_CHUNK):
        yield _fetch(conn, by_list, {"ids": sparse[start:start + _IN_CHUNK]})


def _range_rows(conn: Connection, name: str, low: int, high: int) -> Iterator[list[Any]]:
    """The rows of side table ``name`` for conversation ids ``low..high``, in batches as
    :func:`_side_rows` gives them (windows of the id range)."""
    by_range = _SIDE[name][0]
    for start in range(low, high + 1, _WINDOW):
        yield _fetch(conn, by_range, {"lo": start, "hi": min(start + _WINDOW - 1, high)})


@contextmanager
def _gc_paused(pause: bool) -> Iterator[None]:
    """Collector off for a bulk build of acyclic objects, back on after (if it was on: two
    loads at once leave it to the first to switch back, and it only ever runs later)."""
    enabled = pause and gc.isenabled()
    if enabled:
        gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _custom_values(rows: list[Any]) -> list[CustomValue]:
    """The values of custom rows ``(conversation, key, text, number, flag)`` as
    :func:`~livecount.domain.canonical_custom` left them (a REAL cannot say 1 from 1.0)."""
    _, _, texts, numbers, flags = zip(*rows, strict=True)
    if (texts.count(None) == len(rows) and flags.count(None) == len(rows)
            and set(map(type, numbers)) == {float} and all(map(float.is_integer, numbers))
            and min(numbers) >= -MAX_SAFE_INTEGER and max(numbers) <= MAX_SAFE_INTEGER):
        return list(map(int, numbers))  # the usual batch: integral numbers only
    return [text if text is not None else bool(flag) if flag is not None else stored_number(number)
            for text, number, flag in zip(texts, numbers, flags, strict=True)]


class _Sides:
    """The side tables of a set of conversations, by conversation id."""

    def __init__(self, batches: _Batches) -> None:
        # Equal sets are shared: one object per distinct set (most are small and repeat).
        shared: dict[frozenset[Any], frozenset[Any]] = {}
        share = shared.setdefault
        self.tags: dict[int, frozenset[str]] = {}
        for batch in batches("tags"):
            for cid, group in groupby(batch, _FIRST):
                found = frozenset(map(_SECOND, group))
                self.tags[cid] = share(found, found)
        shared = {}
        share = shared.setdefault
        people: tuple[dict[int, frozenset[int]], dict[int, frozenset[int]]] = ({}, {})
        for batch in batches("people"):
            for (cid, field), group in groupby(batch, _FIRST_TWO):
                if field in _PEOPLE:
                    found = frozenset(map(_THIRD, group))
                    people[field == "unread_by"][cid] = share(found, found)
        self.mentions, self.unread_by = people
        self.custom: dict[int, dict[str, CustomValue]] = {}
        for rows in batches("custom"):
            if rows:
                self._add_custom(rows)

    def _add_custom(self, rows: list[Any]) -> None:
        custom = self.custom
        values = _custom_values(rows)
        cids = list(map(_FIRST, rows))
        if not any(map(eq, cids, islice(cids, 1, None))):  # one key each: build in C
            pairs = zip(map(_SECOND, rows), values, strict=True)
            # dict(((key, value),)) == {key: value}
            custom.update(zip(cids, map(dict, zip(pairs, strict=True)), strict=True))
            return
        get = custom.get
        for cid, key, value in zip(cids, map(_SECOND, rows), values, strict=True):
            found = get(cid)
            if found is None:
                custom[cid] = {key: value}
            else:
                found[key] = value

    def images(self, rows: list[Any]) -> list[Image]:
        """Images of ``rows`` (the :data:`_COLUMNS` of some conversations), built in C-level
        passes: columns by ``zip``, images by ``map`` with positional arguments."""
        (ids, workspace_ids, versions, states, assignees, teams, authors, priorities,
         channels, created, updated, waiting, snoozed) = zip(*rows, strict=True)
        return list(map(
            Image, ids, workspace_ids, versions, map(intern, states), assignees, teams,
            authors, map(bool, priorities), map(intern, channels),
            map(self.tags.get, ids, repeat(_EMPTY)), map(self.mentions.get, ids, repeat(_EMPTY)),
            map(self.unread_by.get, ids, repeat(_EMPTY)), created, updated, waiting, snoozed,
            map(self.custom.get, ids, map(dict, repeat(())))))


def load_images(conn: Connection, where: sa.ColumnElement[bool] | None = None,
                order_by: Sequence[Any] = (conversations.c.id,),
                limit: int | None = None, *, bulk: bool = False) -> list[Image]:
    """Read whole images for the conversations matching ``where`` (ids ascending by default).

    ``bulk`` is for whole-workspace snapshots (a million conversations): when the matching
    ids fill at least half of their range, the side tables are read first by id range (their
    primary keys' order, no IN lists), then the rows are fetched and turned into images a
    chunk at a time. Otherwise (and always without ``bulk``: loading one conversation or a
    page must not pay a bounds query first) the rows come first and the side tables are read
    for their ids (ranges where they are dense, IN lists elsewhere). Rows are grouped per
    conversation and images built in C-level passes (``map``/``zip``), equal sets shared.
    """
    query = sa.select(*_COLUMNS).order_by(*order_by)
    if where is not None:
        query = query.where(where)
    if limit is None and bulk:
        bounds = sa.select(sa.func.min(conversations.c.id), sa.func.max(conversations.c.id),
                           sa.func.count())
        low, high, total = _fetch(conn, bounds if where is None else bounds.where(where))[0]
        if not total:
            return []
        if high - low < 2 * total:
            images: list[Image] = []
            with _gc_paused(total >= _PAUSE_GC_AT):
                sides = _Sides(lambda name: _range_rows(conn, name, low, high))
                for chunk in _fetch_chunks(conn, query, None, _BUILD_CHUNK):
                    images += sides.images(chunk)
                del sides
            return images
    elif limit is not None:
        query = query.limit(limit)
    rows = _fetch(conn, query)
    if not rows:
        return []
    with _gc_paused(len(rows) >= _PAUSE_GC_AT):
        ordered = sorted(map(_FIRST, rows))
        sides = _Sides(lambda name: _side_rows(conn, name, ordered))
        images = []
        for start in range(0, len(rows), _BUILD_CHUNK):  # in chunks: the columns stay cached
            images += sides.images(rows[start:start + _BUILD_CHUNK])
        del rows, sides  # freed before the collector runs again: only the images remain
    return images
