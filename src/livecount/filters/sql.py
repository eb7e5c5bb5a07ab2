"""Filter tree → a SQL WHERE clause over ``conversations``, for listing and recounting.

It must give exactly the answer of :func:`~livecount.filters.predicate.compile_predicate` on
SQLite and PostgreSQL, so SQL's three-valued logic is never let in: every compiled comparison
is TRUE or FALSE, never NULL (a nullable column is tested ``IS NOT NULL`` first, side tables
are read through ``EXISTS``), which makes ``NOT`` and the negative operators exact negations.

The few per-dialect differences are SQLAlchemy ``@compiles`` constructs, so one compiled
expression runs on either engine:

- case-insensitive matching (``~ !~ ^ $``) lowers the needle in Python with
  :func:`~livecount.domain.lower` and the column in SQL. SQLite calls the same Python function,
  registered on each connection by :func:`register_sqlite_functions`. PostgreSQL's ``lower()``
  maps one code point to one code point with the database's ctype, which differs from
  Python's ``str.lower`` in two places, both emulated here: ``'İ'`` (U+0130) lowers to
  ``'i̇'`` (``i`` + U+0307) in Python but to ``'i'`` in PostgreSQL, so it is replaced first;
  and Python lowers a *final* capital sigma to ``'ς'`` (Unicode's Final_Sigma context) where
  PostgreSQL always gives ``'σ'``, so a regular expression, built from Python's own Cased and
  Case_Ignorable properties, rewrites final sigmas first. With those two, PostgreSQL 15 with a
  ``C.UTF-8``/libc UTF-8 ctype agrees with Python 3.11 on every code point (the tests sweep
  all of them); a database whose ctype uses another Unicode version than Python's may still
  lower newly assigned letters differently, and a Turkish ctype lowers ``'I'`` to ``'ı'``
  (run the tests' code point sweep against a production database to know);
- ``< <= > >=`` on strings compare code points: ``COLLATE BINARY`` on SQLite, ``COLLATE "C"``
  on PostgreSQL (UTF-8 byte order is code point order), whatever the column's collation;
- substring search is ``instr`` on SQLite, ``strpos`` on PostgreSQL; no ``LIKE`` (SQLite's
  is case-insensitive for ASCII, and ``%``, ``_``, ``\\`` would need escaping).
"""

from __future__ import annotations

import functools
import operator
import unicodedata
from collections.abc import Callable
from dataclasses import replace
from typing import Any, Final

import sqlalchemy as sa
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql import ColumnElement, FromClause
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.functions import FunctionElement

from ..domain import FIELDS, CustomValue, FieldKind, lower
from ..store.schema import (
    conversation_custom,
    conversation_people,
    conversation_tags,
    conversations,
)
from .tree import NEGATIONS, And, Comparison, Node, Not, Or

__all__ = ["SQLITE_LOWER", "Me", "compile_sql", "register_sqlite_functions", "sql_lower"]

#: The viewer: a teammate id (``NOBODY`` for none) or a SQL column of teammate ids (never NULL).
Me = int | ColumnElement[Any]

#: Name of the SQLite function :func:`register_sqlite_functions` installs.
SQLITE_LOWER: Final = "lc_lower"

_ORDER: Final[dict[str, Callable[[Any, Any], ColumnElement[bool]]]] = {
    "<": operator.lt, "<=": operator.le, ">": operator.gt, ">=": operator.ge,
}


def compile_sql(node: Node, me: Me, now: int) -> ColumnElement[bool]:
    """The WHERE clause selecting the ``conversations`` rows for which ``node`` holds.

    ``me`` is the viewer (an int, or a column for one count per teammate in one query);
    ``now`` is the time in microseconds for ``older_than``/``newer_than``.
    """
    return _Compiler(me, now).expr(node)


def register_sqlite_functions(dbapi_connection: Any) -> None:
    """Install ``lc_lower`` on a new sqlite3 connection (call it from a "connect" event)."""
    dbapi_connection.create_function(SQLITE_LOWER, 1, _sqlite_lower, deterministic=True)


def _sqlite_lower(value: Any) -> str | None:
    return lower(value) if isinstance(value, str) else None


class _Compiler:
    def __init__(self, me: Me, now: int) -> None:
        self.me = me
        self.now = now

    def expr(self, node: Node) -> ColumnElement[bool]:
        match node:
            case And(children):
                return sa.and_(*(self.expr(c) for c in children))
            case Or(children):
                return sa.or_(*(self.expr(c) for c in children))
            case Not(child):
                return sa.not_(self.expr(child))
            case Comparison(op=op) if op in NEGATIONS:
                return sa.not_(self.expr(replace(node, op=NEGATIONS[op])))
            case Comparison(kind=FieldKind.CUSTOM):
                return self.custom(node)
            case Comparison(kind=kind) if kind.multi:
                return self.multi(node)
            case Comparison():
                return self.scalar(node)
        raise AssertionError(node)

    def scalar(self, node: Comparison) -> ColumnElement[bool]:
        """A comparison on a column of ``conversations`` (field names come from FIELDS)."""
        column = conversations.c[node.field]
        op, value = node.op, node.value
        if op == "is null":
            return column.is_(None)
        test: ColumnElement[bool]
        if op == "=":
            test = column == (self.me if node.me else value)
        elif op == "IN":
            parts = [column == self.me] if node.me else []
            if value:
                parts.append(column.in_(value))
            test = sa.or_(*parts)
        elif op in _ORDER:
            subject = _code_points(column) if node.kind is FieldKind.STRING else column
            test = _ORDER[op](subject, value)
        elif op in ("~", "^", "$"):
            test = _text(column, op, value)
        elif op == "older_than":
            test = column <= self.now - value
        elif op == "newer_than":
            test = column > self.now - value
        else:
            raise AssertionError(node)
        if FIELDS[node.field].nullable:
            return sa.and_(column.is_not(None), test)
        return test

    def multi(self, node: Comparison) -> ColumnElement[bool]:
        """``tags``, ``mentions``, ``unread_by``: rows of a side table, read with EXISTS."""
        if node.field == "tags":
            tags = conversation_tags.alias()
            side: FromClause = tags
            member: ColumnElement[Any] = tags.c.tag
            conditions = [tags.c.conversation_id == conversations.c.id]
        else:
            people = conversation_people.alias()
            side, member = people, people.c.teammate_id
            conditions = [people.c.conversation_id == conversations.c.id,
                          people.c.field == node.field]
        if node.op == "is null":
            return sa.not_(_exists(side, conditions))
        if node.op == "contains":
            wanted = self.me if node.me else node.value
            return _exists(side, [*conditions, member == wanted])
        raise AssertionError(node)

    def custom(self, node: Comparison) -> ColumnElement[bool]:
        """``custom.<key>``: one typed row of ``conversation_custom``, or none when missing."""
        row = conversation_custom.alias()
        conditions = [row.c.conversation_id == conversations.c.id, row.c.key == node.custom_key]
        op, value = node.op, node.value
        if op == "is null":
            return sa.not_(_exists(row, conditions))
        if op == "=":
            conditions.append(_custom_equals(row, value))
        elif op == "IN":
            conditions.append(_custom_in(row, value))
        elif op in _ORDER:
            if isinstance(value, str):
                conditions.append(_ORDER[op](_code_points(row.c.text_value), value))
            else:
                conditions.append(_ORDER[op](row.c.num_value, _double(value)))
        elif op in ("~", "^", "$"):
            conditions.append(_text(row.c.text_value, op, value))
        else:
            raise AssertionError(node)
        return _exists(row, conditions)


def _exists(side: FromClause, conditions: list[ColumnElement[bool]]) -> ColumnElement[bool]:
    """``EXISTS`` over a fresh alias, correlated to everything else (conversations, ``me``)."""
    return sa.select(sa.literal(1)).select_from(side).where(*conditions) \
        .correlate_except(side).exists()


def _double(value: int | float) -> ColumnElement[float]:
    # Bound as a double: PostgreSQL would cast a Python int to INTEGER and overflow.
    return sa.literal(float(value), sa.Double())


def _custom_equals(row: FromClause, value: CustomValue) -> ColumnElement[bool]:
    if isinstance(value, bool):
        return row.c.bool_value == value
    if isinstance(value, str):
        return row.c.text_value == value
    return row.c.num_value == _double(value)


def _custom_in(row: FromClause, values: tuple[CustomValue, ...]) -> ColumnElement[bool]:
    flags = [v for v in values if isinstance(v, bool)]
    texts = [v for v in values if isinstance(v, str)]
    numbers = [float(v) for v in values if not isinstance(v, bool | str)]
    parts: list[ColumnElement[bool]] = []
    if flags:
        parts.append(row.c.bool_value.in_(flags))
    if texts:
        parts.append(row.c.text_value.in_(texts))
    if numbers:
        parts.append(row.c.num_value.in_([_double(n) for n in numbers]))
    return sa.or_(*parts)


def _text(column: ColumnElement[Any], op: str, value: str) -> ColumnElement[bool]:
    """``~ ^ $``, case-insensitive; NULL only when ``column`` is (callers guard for that)."""
    needle = lower(value)
    if not needle:  # every string contains, starts and ends with ""
        return column.is_not(None)
    lowered = sql_lower(column)
    if op == "~":
        return _Find(lowered, sa.literal(needle, sa.Text())) > 0
    if op == "^":
        return sa.func.substr(lowered, 1, len(needle)) == needle
    return _Suffix(lowered, sa.literal(len(needle), sa.Integer())) == needle


# -- per-dialect constructs ---------------------------------------------------------------


class _Lower(FunctionElement[str]):
    type = sa.Text()
    name = "lc_lower"
    inherit_cache = True


class _Find(FunctionElement[int]):
    """1-based position of the needle in the haystack, 0 when absent (code points)."""

    type = sa.Integer()
    name = "strpos"
    inherit_cache = True


class _Suffix(FunctionElement[str]):
    """The last ``n`` code points of a string (the whole string when shorter)."""

    type = sa.Text()
    name = "right"
    inherit_cache = True


class _CodePoints(FunctionElement[str]):
    """A string that compares by code point."""

    type = sa.Text()
    name = "code_points"
    inherit_cache = True


def sql_lower(column: ColumnElement[Any]) -> ColumnElement[str]:
    """SQL for :func:`livecount.domain.lower` of ``column``, on SQLite or PostgreSQL."""
    return _Lower(column)


def _code_points(column: ColumnElement[Any]) -> ColumnElement[str]:
    return _CodePoints(column)


def _args(element: FunctionElement[Any]) -> list[ColumnElement[Any]]:
    return list(element.clauses)


@compiles(_Lower)
def _lower_default(element: _Lower, compiler: SQLCompiler, **kw: Any) -> str:
    raise sa.exc.CompileError(f"no lower-casing for dialect {compiler.dialect.name!r}")


@compiles(_Lower, "sqlite")
def _lower_sqlite(element: _Lower, compiler: SQLCompiler, **kw: Any) -> str:
    return f"{SQLITE_LOWER}({compiler.process(element.clauses, **kw)})"


@compiles(_Lower, "postgresql")
def _lower_postgresql(element: _Lower, compiler: SQLCompiler, **kw: Any) -> str:
    (text,) = _args(element)
    sigma = sa.case(
        (sa.func.strpos(text, sa.literal("\u03a3", sa.Text())) > 0,
         sa.func.regexp_replace(text, sa.literal(_final_sigma_pattern(), sa.Text()),
                                sa.literal("\u03c2", sa.Text()), sa.literal("g", sa.Text()))),
        else_=text,
    )
    dotted = sa.func.replace(sigma, sa.literal("\u0130", sa.Text()),
                             sa.literal("i\u0307", sa.Text()))
    return compiler.process(sa.func.lower(dotted), **kw)


@compiles(_Find, "sqlite")
def _find_sqlite(element: _Find, compiler: SQLCompiler, **kw: Any) -> str:
    return f"instr({compiler.process(element.clauses, **kw)})"


@compiles(_Find)
def _find_default(element: _Find, compiler: SQLCompiler, **kw: Any) -> str:
    return f"strpos({compiler.process(element.clauses, **kw)})"


@compiles(_Suffix, "sqlite")
def _suffix_sqlite(element: _Suffix, compiler: SQLCompiler, **kw: Any) -> str:
    text, length = _args(element)
    return f"substr({compiler.process(text, **kw)}, -({compiler.process(length, **kw)}))"


@compiles(_Suffix)
def _suffix_default(element: _Suffix, compiler: SQLCompiler, **kw: Any) -> str:
    return f"right({compiler.process(element.clauses, **kw)})"


@compiles(_CodePoints, "postgresql")
def _code_points_postgresql(element: _CodePoints, compiler: SQLCompiler, **kw: Any) -> str:
    return f'({compiler.process(element.clauses, **kw)}) COLLATE "C"'


@compiles(_CodePoints)
def _code_points_default(element: _CodePoints, compiler: SQLCompiler, **kw: Any) -> str:
    raise sa.exc.CompileError(f"no code point order for dialect {compiler.dialect.name!r}")


@compiles(_CodePoints, "sqlite")
def _code_points_sqlite(element: _CodePoints, compiler: SQLCompiler, **kw: Any) -> str:
    return f"({compiler.process(element.clauses, **kw)}) COLLATE BINARY"  # memcmp of UTF-8


@functools.cache
def _final_sigma_pattern() -> str:
    """A PostgreSQL regular expression matching each capital sigma Python lowers to ``ς``.

    Python's rule (Unicode Final_Sigma): a cased letter, then case-ignorable characters, then
    Σ, and no case-ignorable characters followed by a cased letter after it. Both character
    sets are read off Python's own ``str.lower`` (so they follow its Unicode version), as
    bracket expressions of ``\\uXXXX`` escapes.
    """
    cased: list[int] = []
    ignorable: list[int] = []
    for code in range(0x110000):
        char = chr(code)
        if unicodedata.category(char) in ("Cn", "Cs", "Co"):
            continue
        if (char + "\u03a3").lower()[-1] == "\u03c2":  # cased, and not skipped as ignorable
            cased.append(code)
        elif ("A" + char + "\u03a3").lower()[-1] == "\u03c2":  # skipped: case-ignorable
            ignorable.append(code)
    before, between = _bracket(cased), _bracket(ignorable)
    return f"(?<={before}{between}*)\u03a3(?!{between}*{before})"


def _bracket(codes: list[int]) -> str:
    ranges: list[list[int]] = []
    for code in codes:
        if ranges and ranges[-1][1] == code - 1:
            ranges[-1][1] = code
        else:
            ranges.append([code, code])

    def escape(code: int) -> str:
        return f"\\u{code:04x}" if code <= 0xFFFF else f"\\U{code:08x}"

    return "[" + "".join(escape(a) if a == b else f"{escape(a)}-{escape(b)}"
                         for a, b in ranges) + "]"
