"""Index views by the values their filters pin, so a change only looks at candidate views.

For each view we derive a *necessary condition* in disjunctive form: a short list of
conjunctions of atoms ``field = value`` (or ``value ∈ field`` for the multi-valued fields)
such that the view can only match an image that satisfies at least one of them. It is
computed from the filter tree: an equality, ``IN``, ``is null`` or ``contains`` gives atoms;
``AND`` multiplies its children's lists (keeping the most selective ones), ``OR`` adds them
up, and anything else (``NOT``, ranges, text, ``custom.*``, ``$me``) constrains nothing.

The conjunctions of the same *shape* (set of fields) share one hash table keyed by the
image's values for those fields, so finding the candidates of an image costs one dictionary
lookup per shape (times the size of a multi-valued field in the shape), whatever the number
of views. A view with no usable condition is always a candidate.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from operator import attrgetter
from typing import Any, Final

from ..domain import FIELDS, FieldKind, Image
from ..filters.tree import And, Comparison, Node, Not, Or
from .views import CompiledView

__all__ = ["ViewIndex", "necessary_condition"]

Atom = tuple[str, Any]
Conjunction = frozenset[Atom]

MAX_DISJUNCTS: Final = 16
MAX_ATOMS: Final = 3
#: Fields usable as keys, most selective first (trimming keeps the front of this order).
KEY_ORDER: Final = ("team_id", "assignee_id", "author_id", "tags", "mentions", "unread_by",
                    "channel", "state", "priority")
_RANK: Final = {name: i for i, name in enumerate(KEY_ORDER)}
_MULTI: Final = frozenset(n for n in KEY_ORDER if FIELDS[n].kind.multi)


def necessary_condition(node: Node) -> list[Conjunction] | None:
    """Conjunctions one of which every matching image satisfies; None when there are none."""
    match node:
        case Comparison(me=True):
            return None
        case Comparison(field=name, op=op, value=value) if name in _RANK:
            if name in _MULTI:
                return [frozenset({(name, value)})] if op == "contains" else None
            if op == "=":
                return [frozenset({(name, value)})]
            if op == "IN" and len(value) <= MAX_DISJUNCTS:
                return [frozenset({(name, v)}) for v in value]
            if op == "is null" and FIELDS[name].nullable:
                return [frozenset({(name, None)})]
            return None
        case Comparison() | Not():
            return None
        case Or(children):
            out: list[Conjunction] = []
            for child in children:
                part = necessary_condition(child)
                if part is None:
                    return None
                out.extend(part)
            return out if len(out) <= MAX_DISJUNCTS else None
        case And(children):
            parts = sorted((p for c in children if (p := necessary_condition(c)) is not None),
                           key=len)
            if not parts:
                return None
            result: list[Conjunction] = [frozenset()]
            for part in parts:
                if len(result) * len(part) > MAX_DISJUNCTS:
                    break
                result = [m for r in result for d in part if _consistent(m := r | d)]
            return result
    raise AssertionError(node)


def _consistent(conjunction: Conjunction) -> bool:
    """False when two atoms pin one single-valued field to different values."""
    seen: dict[str, Any] = {}
    for name, value in conjunction:
        if name in _MULTI:
            continue
        if name in seen and seen[name] != value:
            return False
        seen[name] = value
    return True


def _trim(conjunction: Conjunction) -> tuple[Atom, ...]:
    """At most MAX_ATOMS atoms with at most one multi-valued field (dropping atoms is sound)."""
    atoms = sorted(conjunction, key=lambda a: (_RANK[a[0]], repr(a[1])))
    kept: list[Atom] = []
    multi = False
    for atom in atoms:
        if atom[0] in _MULTI:
            if multi:
                continue
            multi = True
        kept.append(atom)
        if len(kept) == MAX_ATOMS:
            break
    # canonical layout: single-valued fields in KEY_ORDER, then the multi-valued one
    return tuple(sorted(kept, key=lambda a: (a[0] in _MULTI, _RANK[a[0]])))


class _Shape:
    """All conjunctions over one set of fields, in one table keyed by those fields' values."""

    def __init__(self, fields: tuple[str, ...]) -> None:
        self.fields = fields
        singles = [f for f in fields if f not in _MULTI]
        self.multi: str | None = fields[-1] if fields[-1] in _MULTI else None
        self.single: Callable[[Image], Any] | None = attrgetter(*singles) if singles else None
        self.table: dict[Any, list[CompiledView]] = {}

    def key(self, atoms: tuple[Atom, ...]) -> Any:
        values = [v for _, v in atoms]
        if self.multi is None:
            return values[0] if len(values) == 1 else tuple(values)
        if self.single is None:
            return values[-1]
        singles = values[:-1]
        return (singles[0] if len(singles) == 1 else tuple(singles), values[-1])

    @property
    def multi_getter(self) -> Callable[[Image], frozenset[Any]]:
        assert self.multi is not None
        return attrgetter(self.multi)


class ViewIndex:
    """Candidate views for a pair of images, found by their necessary conditions."""

    def __init__(self, views: Iterable[CompiledView]) -> None:
        self.shapes: dict[tuple[str, ...], _Shape] = {}
        self.unindexed: list[CompiledView] = []
        self.size = 0
        for view in views:
            self.size += 1
            condition = necessary_condition(view.tree)
            if condition is None or any(not c for c in condition):
                self.unindexed.append(view)
                view.exact = False
                continue
            view.exact = len(condition) == 1
            for conjunction in dict.fromkeys(_trim(c) for c in condition):
                fields = tuple(name for name, _ in conjunction)
                shape = self.shapes.get(fields)
                if shape is None:
                    shape = self.shapes[fields] = _Shape(fields)
                bucket = shape.table.setdefault(shape.key(conjunction), [])
                if view not in bucket:
                    bucket.append(view)
        shapes = self.shapes.values()
        self._singles = tuple((s.single, s.table) for s in shapes
                              if s.multi is None and s.single is not None)
        self._multis = tuple((s.single, s.multi_getter, s.table) for s in shapes
                             if s.multi is not None)

    def collect(self, before: Image | None, after: Image | None,
                out: list[CompiledView], tick: int) -> None:
        """Append to ``out`` every view (not yet marked with ``tick``) that may match
        ``before`` or ``after``. The hot path of the engine: kept flat on purpose.

        With both images, each new candidate's ``side`` records which of them satisfied a
        key of its: 1 before, 2 after, 3 both (or unknown). A view whose necessary condition
        is one conjunction (``exact``) cannot match an image none of whose keys it has.
        """
        if before is None or after is None:
            keys: list[Any] = []
            image = after if before is None else before
            assert image is not None
            for getter, table in self._singles:
                bucket = table.get(getter(image))
                if bucket:
                    for view in bucket:
                        if view.tick != tick:
                            view.tick = tick
                            out.append(view)
            for single, elements, table in self._multis:
                keys.clear()
                if single is None:
                    keys.extend(elements(image))
                else:
                    prefix = single(image)
                    keys.extend((prefix, e) for e in elements(image))
                for key in keys:
                    bucket = table.get(key)
                    if bucket:
                        for view in bucket:
                            if view.tick != tick:
                                view.tick = tick
                                out.append(view)
        else:
            for getter, table in self._singles:
                kb = getter(before)
                ka = getter(after)
                side = 3 if ka == kb else 1
                bucket = table.get(kb)
                if bucket:
                    for view in bucket:
                        if view.tick != tick:
                            view.tick = tick
                            view.side = side
                            out.append(view)
                        else:
                            view.side |= side
                if side == 1:
                    bucket = table.get(ka)
                    if bucket:
                        for view in bucket:
                            if view.tick != tick:
                                view.tick = tick
                                view.side = 2
                                out.append(view)
                            else:
                                view.side |= 2
            for single, elements, table in self._multis:
                eb, ea = elements(before), elements(after)
                if single is None:
                    kbs: Any = eb
                    kas: Any = ea
                else:
                    pb, pa = single(before), single(after)
                    kbs = {(pb, e) for e in eb}
                    kas = {(pa, e) for e in ea}
                for key in kbs:
                    bucket = table.get(key)
                    if bucket:
                        side = 3 if key in kas else 1
                        for view in bucket:
                            if view.tick != tick:
                                view.tick = tick
                                view.side = side
                                out.append(view)
                            else:
                                view.side |= side
                for key in kas:
                    if key in kbs:
                        continue
                    bucket = table.get(key)
                    if bucket:
                        for view in bucket:
                            if view.tick != tick:
                                view.tick = tick
                                view.side = 2
                                out.append(view)
                            else:
                                view.side |= 2
        for view in self.unindexed:
            if view.tick != tick:
                view.tick = tick
                out.append(view)
            view.side = 3

    def stats(self) -> dict[str, Any]:
        return {
            "views": self.size,
            "unindexed": len(self.unindexed),
            "shapes": {",".join(s.fields): len(s.table) for s in self.shapes.values()},
        }


# Fail fast if the domain grows a key field the index cannot handle.
assert all(FIELDS[n].kind is not FieldKind.CUSTOM for n in KEY_ORDER)
