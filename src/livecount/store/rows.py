"""Images ⇄ rows: how one conversation is spread over ``conversations`` and its side tables.

Synchronous SQLAlchemy Core helpers used inside a store's transaction (and by tests that need
rows without a store).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from ..domain import MAX_SAFE_INTEGER, CustomValue, Image
from .schema import conversation_custom, conversation_people, conversation_tags, conversations

__all__ = ["delete_image", "insert_image", "load_images", "update_image"]

_SCALARS = ("workspace_id", "version", "state", "assignee_id", "team_id", "author_id",
            "priority", "channel", "created_at", "updated_at", "waiting_since", "snoozed_until")
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


def insert_image(conn: Connection, image: Image) -> None:
    """Insert a new conversation row (with its explicit id) and its side rows."""
    values = {name: getattr(image, name) for name in _SCALARS}
    conn.execute(conversations.insert().values(id=image.id, **values))
    _insert_sets(conn, image, ("tags", *_PEOPLE, "custom"))


def update_image(conn: Connection, before: Image, after: Image) -> bool:
    """Write ``after`` over ``before`` if the row is still at ``before.version``.

    Returns False when another writer got there first (optimistic concurrency). Side tables
    are rewritten only for the sets that changed.
    """
    values = {name: getattr(after, name) for name in _SCALARS
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


def _number(value: float) -> int | float:
    # As canonical_custom leaves it: integral floats past 2**53 stay floats ("1e+20" groups).
    return int(value) if value.is_integer() and abs(value) <= MAX_SAFE_INTEGER else value


def load_images(conn: Connection, where: sa.ColumnElement[bool] | None = None,
                order_by: Sequence[Any] = (conversations.c.id,),
                limit: int | None = None) -> list[Image]:
    """Read whole images for the conversations matching ``where`` (ids ascending by default)."""
    query = sa.select(conversations).order_by(*order_by)
    if where is not None:
        query = query.where(where)
    if limit is not None:
        query = query.limit(limit)
    rows = conn.execute(query).mappings().all()
    if not rows:
        return []
    ids = [r["id"] for r in rows]
    tags: dict[int, set[str]] = defaultdict(set)
    people: dict[tuple[int, str], set[int]] = defaultdict(set)
    custom: dict[int, dict[str, CustomValue]] = defaultdict(dict)
    for chunk_start in range(0, len(ids), 500):
        chunk = ids[chunk_start:chunk_start + 500]
        for cid, tag in conn.execute(
                sa.select(conversation_tags.c.conversation_id, conversation_tags.c.tag)
                .where(conversation_tags.c.conversation_id.in_(chunk))):
            tags[cid].add(tag)
        for cid, field, tid in conn.execute(
                sa.select(conversation_people.c.conversation_id, conversation_people.c.field,
                          conversation_people.c.teammate_id)
                .where(conversation_people.c.conversation_id.in_(chunk))):
            people[cid, field].add(tid)
        for cid, key, text, num, flag in conn.execute(
                sa.select(conversation_custom.c.conversation_id, conversation_custom.c.key,
                          conversation_custom.c.text_value, conversation_custom.c.num_value,
                          conversation_custom.c.bool_value)
                .where(conversation_custom.c.conversation_id.in_(chunk))):
            custom[cid][key] = (text if text is not None else
                                bool(flag) if flag is not None else _number(num))
    return [
        Image(id=r["id"], workspace_id=r["workspace_id"], version=r["version"],
              state=r["state"], assignee_id=r["assignee_id"], team_id=r["team_id"],
              author_id=r["author_id"], priority=bool(r["priority"]), channel=r["channel"],
              tags=frozenset(tags.get(r["id"], ())),
              mentions=frozenset(people.get((r["id"], "mentions"), ())),
              unread_by=frozenset(people.get((r["id"], "unread_by"), ())),
              created_at=r["created_at"], updated_at=r["updated_at"],
              waiting_since=r["waiting_since"], snoozed_until=r["snoozed_until"],
              custom=custom.get(r["id"], {}))
        for r in rows
    ]
