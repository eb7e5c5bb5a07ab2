"""The parsed filter: one immutable tree that both compilations (predicate, SQL) read."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Final

from ..domain import FieldKind

__all__ = [
    "NEGATIONS",
    "NULL_OPERATORS",
    "TIME_OPERATORS",
    "And",
    "Comparison",
    "Node",
    "Not",
    "Or",
    "bind_me",
    "fields_read",
    "uses_me",
    "uses_time",
]

#: Negative operator → the positive one it is the exact negation of.
NEGATIONS: Final = {"!=": "=", "NIN": "IN", "!~": "~", "not_contains": "contains",
                    "is not null": "is null"}
NULL_OPERATORS: Final = frozenset({"is null", "is not null"})
TIME_OPERATORS: Final = frozenset({"older_than", "newer_than"})


@dataclass(frozen=True, slots=True)
class Comparison:
    """``field operator value``, with ``value`` already validated and made canonical.

    ``value`` is None for the null tests and for a bare ``$me``; a tuple for ``IN``/``NIN``;
    integer microseconds for timestamps and for ``older_than``/``newer_than`` spans.
    ``me`` says the value includes ``$me`` (alone, or as one element of an ``IN`` list).
    """

    field: str
    kind: FieldKind
    op: str
    value: Any = None
    me: bool = False

    @property
    def custom_key(self) -> str:
        return self.field[7:]


@dataclass(frozen=True, slots=True)
class And:
    children: tuple[Node, ...]


@dataclass(frozen=True, slots=True)
class Or:
    children: tuple[Node, ...]


@dataclass(frozen=True, slots=True)
class Not:
    child: Node


Node = Comparison | And | Or | Not


def fields_read(node: Node) -> frozenset[str]:
    """Every field the filter reads (``custom.<key>`` by key)."""
    match node:
        case Comparison(field=field):
            return frozenset((field,))
        case And(children) | Or(children):
            return frozenset().union(*(fields_read(c) for c in children))
        case Not(child):
            return fields_read(child)
    raise AssertionError(node)


def uses_me(node: Node) -> bool:
    match node:
        case Comparison(me=me):
            return me
        case And(children) | Or(children):
            return any(uses_me(c) for c in children)
        case Not(child):
            return uses_me(child)
    raise AssertionError(node)


def uses_time(node: Node) -> bool:
    """True when membership can change with the clock alone (``older_than``/``newer_than``)."""
    match node:
        case Comparison(op=op):
            return op in TIME_OPERATORS
        case And(children) | Or(children):
            return any(uses_time(c) for c in children)
        case Not(child):
            return uses_time(child)
    raise AssertionError(node)


def bind_me(node: Node, teammate_id: int) -> Node:
    """Replace ``$me`` by a concrete teammate (a personal view has exactly one viewer)."""
    match node:
        case Comparison(me=False):
            return node
        case Comparison(op="IN", value=values):
            return replace(node, value=tuple(dict.fromkeys((*values, teammate_id))), me=False)
        case Comparison():
            return replace(node, value=teammate_id, me=False)
        case And(children):
            return And(tuple(bind_me(c, teammate_id) for c in children))
        case Or(children):
            return Or(tuple(bind_me(c, teammate_id) for c in children))
        case Not(child):
            return Not(bind_me(child, teammate_id))
    raise AssertionError(node)
