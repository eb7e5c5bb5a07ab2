"""The store's read queries built on the SQL compilation of filters: recount and listing.

Synchronous SQLAlchemy Core, run by the stores inside their own transactions, so a recount
reads one consistent snapshot. :func:`python_counts` is the same count by evaluating the
predicate over images: the reference the SQL is tested against (and a baseline for the engine).
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from collections.abc import Iterable, Sequence
from typing import Any, Final

import sqlalchemy as sa
from sqlalchemy.engine import Connection
from sqlalchemy.sql import ColumnElement, FromClause, Select

from ..domain import (
    FIELDS,
    GROUPABLE,
    MAX_SAFE_INTEGER,
    NOBODY,
    FieldKind,
    Image,
    group_text,
    image_groups,
)
from ..exceptions import ValidationError
from ..filters.parse import parse_filter
from ..filters.predicate import compile_predicate
from ..filters.sql import compile_sql
from ..filters.tree import Node, bind_me, uses_me
from .base import Counts, View
from .schema import conversation_custom, conversation_people, conversation_tags, conversations

__all__ = [
    "MAX_LIMIT",
    "decode_cursor",
    "encode_cursor",
    "group_condition",
    "list_query",
    "python_counts",
    "recount",
    "split_page",
    "view_node",
]

MAX_LIMIT: Final = 200
_CURSOR: Final = re.compile(r"[1-9][0-9]{0,18}")
_INTEGER: Final = re.compile(r"-?(0|[1-9][0-9]{0,18})")  # as str(int) writes it
_MAX_ID: Final = 2**63 - 1
_C = conversations.c


def view_node(view: View) -> tuple[Node, bool]:
    """The view's filter tree, ``$me`` bound to the owner of a personal view, and whether the
    count differs per teammate (a shared view that uses ``$me``)."""
    node = parse_filter(view.filter)
    if view.owner_id is not None:
        return bind_me(node, view.owner_id), False
    return node, uses_me(node)


# -- recount ------------------------------------------------------------------------------


def recount(conn: Connection, workspace_id: int, views: Sequence[View], now: int) -> Counts:
    """Count every view in SQL, in the counter-state form (see :data:`~.base.Counts`).

    Key ``(view, group, None)`` is the count everybody sees (``$me`` = nobody), key
    ``(view, group, T)`` teammate T's adjustment for a shared ``$me`` view. Zero counts are
    left out, as in the counter state, so the two compare with ``==``.
    """
    counts: Counts = {}
    named = _named_teammates(workspace_id)
    in_workspace = _C.workspace_id == workspace_id
    for view in views:
        node, per_teammate = view_node(view)
        base = compile_sql(node, NOBODY, now)
        source, columns = _group_source(view.group_by)
        if view.group_by is None:
            total = conn.execute(sa.select(sa.func.count()).select_from(conversations)
                                 .where(in_workspace, base)).scalar_one()
            if total:
                counts[view.id, None, None] = total
        else:
            query = (sa.select(*columns, sa.func.count()).select_from(source)
                     .where(in_workspace, base).group_by(*columns))
            grouped: dict[str, int] = defaultdict(int)
            for *values, n in conn.execute(query):
                text = _group_text(view.group_by, values)
                if text is not None:
                    grouped[text] += n
            counts.update(((view.id, g, None), n) for g, n in grouped.items() if n)
        if not per_teammate:
            continue
        # Only conversations naming T can count differently for T than for nobody.
        mine = compile_sql(node, named.c.teammate_id, now)
        change = sa.func.sum(sa.case((mine, 1), else_=0) - sa.case((base, 1), else_=0))
        query = (sa.select(named.c.teammate_id, *columns, change)
                 .select_from(source.join(named, named.c.conversation_id == _C.id))
                 .where(in_workspace, sa.or_(mine, base))
                 .group_by(named.c.teammate_id, *columns))
        adjustments: dict[tuple[str | None, int], int] = defaultdict(int)
        for teammate, *values, n in conn.execute(query):
            text = _group_text(view.group_by, values) if view.group_by else None
            if view.group_by is None or text is not None:
                adjustments[text, teammate] += int(n)
        counts.update(((view.id, g, t), n) for (g, t), n in adjustments.items() if n)
    return counts


def _named_teammates(workspace_id: int) -> sa.Subquery:
    """(conversation, teammate) for every teammate a conversation names in a ``$me`` field."""
    owner = conversations.alias("named_conversation")
    people = conversation_people.alias("named_people")
    in_workspace = owner.c.workspace_id == workspace_id
    return sa.union(
        *(sa.select(owner.c.id.label("conversation_id"), owner.c[name].label("teammate_id"))
          .where(in_workspace, owner.c[name].is_not(None))
          for name in ("assignee_id", "author_id")),
        sa.select(people.c.conversation_id, people.c.teammate_id)
        .select_from(people.join(owner, owner.c.id == people.c.conversation_id))
        .where(in_workspace),
    ).subquery("named")


def _group_source(field: str | None) -> tuple[FromClause, list[ColumnElement[Any]]]:
    """What to join to ``conversations`` and group by, so each row is one (conversation,
    group value) pair: a multi-valued field gives a row per value."""
    if field is None:
        return conversations, []
    if field.startswith("custom."):
        row = conversation_custom.alias("group_custom")
        join = conversations.join(row, sa.and_(row.c.conversation_id == _C.id,
                                               row.c.key == field[7:]))
        return join, [row.c.text_value, row.c.num_value, row.c.bool_value]
    if field == "tags":
        tag = conversation_tags.alias("group_tag")
        return conversations.join(tag, tag.c.conversation_id == _C.id), [tag.c.tag]
    if field in ("mentions", "unread_by"):
        person = conversation_people.alias("group_person")
        join = conversations.join(person, sa.and_(person.c.conversation_id == _C.id,
                                                  person.c.field == field))
        return join, [person.c.teammate_id]
    if field in GROUPABLE:
        return conversations, [_C[field]]
    raise ValidationError(f"{field[:60]!r} cannot group a view", "group_by")


def _group_text(field: str, values: list[Any]) -> str | None:
    """The group's text as :func:`~livecount.domain.group_text` gives it for an image."""
    if field.startswith("custom."):
        text, number, flag = values
        if text is not None:
            return str(text)
        if flag is not None:
            return group_text(bool(flag))
        if number is not None:
            return group_text(_canonical_number(float(number)))
        return None
    (value,) = values
    if value is None:
        return None
    if FIELDS[field].kind is FieldKind.BOOL:
        return group_text(bool(value))
    return group_text(value)


def _canonical_number(value: float) -> int | float:
    """The number as :func:`~livecount.domain.canonical_custom` left it (REAL loses ints)."""
    if value.is_integer() and abs(value) <= MAX_SAFE_INTEGER:
        return int(value)
    return value


# -- the reference ------------------------------------------------------------------------


def python_counts(images: Iterable[Image], views: Sequence[View], now: int) -> Counts:
    """What :func:`recount` returns, by evaluating each view's predicate over ``images``
    (each view counts the images of its own workspace)."""
    counts: Counts = {}
    images = list(images)
    for view in views:
        node, per_teammate = view_node(view)
        predicate = compile_predicate(node)
        field = view.group_by
        base: dict[str | None, int] = defaultdict(int)
        adjustments: dict[tuple[str | None, int], int] = defaultdict(int)
        for image in images:
            if image.workspace_id != view.workspace_id:
                continue
            groups: tuple[str | None, ...] = image_groups(image, field) if field else (None,)
            seen = predicate(image, NOBODY, now)
            if seen:
                for group in groups:
                    base[group] += 1
            if not per_teammate:
                continue
            named = {image.assignee_id, image.author_id, *image.mentions, *image.unread_by}
            named.discard(None)
            for teammate in named:
                assert teammate is not None
                if predicate(image, teammate, now) != seen:
                    for group in groups:
                        adjustments[group, teammate] += -1 if seen else 1
        counts.update(((view.id, g, None), n) for g, n in base.items() if n)
        counts.update(((view.id, g, t), n) for (g, t), n in adjustments.items() if n)
    return counts


# -- listing ------------------------------------------------------------------------------


def list_query(view: View, me: int, group: str | None, limit: int, cursor: str | None,
               now: int) -> Select[Any]:
    """``SELECT conversations.id`` for one page of the view's list as ``me`` sees it, newest
    (highest id) first, below the cursor: up to ``limit + 1`` ids, the extra one only telling
    that another page follows (:func:`split_page` cuts the page and makes its next cursor).

    The caller checks that ``me`` may see the view (a personal view: its owner).
    """
    if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= MAX_LIMIT:
        raise ValidationError(f"must be an integer from 1 to {MAX_LIMIT}, got {limit!r}",
                              "limit")
    node, _ = view_node(view)
    conditions = [_C.workspace_id == view.workspace_id, compile_sql(node, me, now)]
    if group is not None:
        if view.group_by is None:
            raise ValidationError(f"view {view.id} is not grouped; 'group' applies only to "
                                  "views with group_by", "group")
        conditions.append(group_condition(view.group_by, group))
    if cursor is not None:
        conditions.append(_C.id < decode_cursor(cursor))
    return sa.select(_C.id).where(*conditions).order_by(_C.id.desc()).limit(limit + 1)


def encode_cursor(last_id: int) -> str:
    return str(last_id)


def decode_cursor(cursor: str) -> int:
    """The last id of the previous page; raises :class:`ValidationError` for anything else."""
    if isinstance(cursor, str) and _CURSOR.fullmatch(cursor) and int(cursor) <= _MAX_ID:
        return int(cursor)
    shown = repr(cursor)[:40]
    raise ValidationError(f"{shown} is not a cursor; pass the next_cursor of the previous page",
                          "cursor")


def split_page(ids: Sequence[int], limit: int) -> tuple[list[int], str | None]:
    """The page's ids (what :func:`list_query` returned, cut to ``limit``) and the cursor of
    the next page, None when this one is the last."""
    page = list(ids[:limit])
    return page, encode_cursor(page[-1]) if len(ids) > limit else None


def group_condition(field: str, group: str) -> ColumnElement[bool]:
    """Conversations in the group whose text (as ``group_text`` renders it) is ``group``."""
    if not isinstance(group, str):
        raise ValidationError(f"expected a string, got {type(group).__name__}", "group")
    if field.startswith("custom."):
        row = conversation_custom.alias()
        options = [row.c.text_value == group]
        number = _number_for_group(group)
        if number is not None:
            options.append(row.c.num_value == sa.literal(number, sa.Double()))
        if group in ("true", "false"):
            options.append(row.c.bool_value == (group == "true"))
        return (sa.select(sa.literal(1)).select_from(row)
                .where(row.c.conversation_id == _C.id, row.c.key == field[7:], sa.or_(*options))
                .correlate_except(row).exists())
    if field not in GROUPABLE:
        raise ValidationError(f"{field[:60]!r} cannot group a view", "group_by")
    kind = FIELDS[field].kind
    if kind is FieldKind.STRING:
        return _C[field] == group
    if kind is FieldKind.BOOL:
        if group not in ("true", "false"):
            return sa.false()
        return _C[field] == (group == "true")
    if kind is FieldKind.TAGS:
        tag = conversation_tags.alias()
        return (sa.select(sa.literal(1)).select_from(tag)
                .where(tag.c.conversation_id == _C.id, tag.c.tag == group)
                .correlate_except(tag).exists())
    ident = _id_for_group(group)
    if ident is None:
        return sa.false()
    if kind is FieldKind.TEAMMATES:
        person = conversation_people.alias()
        return (sa.select(sa.literal(1)).select_from(person)
                .where(person.c.conversation_id == _C.id, person.c.field == field,
                       person.c.teammate_id == ident)
                .correlate_except(person).exists())
    return _C[field] == ident


def _id_for_group(group: str) -> int | None:
    if _INTEGER.fullmatch(group) and str(int(group)) == group and abs(int(group)) <= _MAX_ID:
        return int(group)
    return None


def _number_for_group(group: str) -> float | None:
    """The number whose group text is ``group`` (``"3"``, ``"2.5"``, ``"1e+20"``), if any."""
    if _INTEGER.fullmatch(group):
        value = int(group)
        return float(value) if abs(value) <= MAX_SAFE_INTEGER and str(value) == group else None
    try:
        number = float(group)
    except ValueError:
        return None
    if not math.isfinite(number) or group_text(_canonical_number(number)) != group:
        return None
    return number
