"""A view made ready for incremental counting: predicate, grouping, the fields it reads."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Final

from ..domain import FIELDS, FieldKind, Image, group_text
from ..filters.parse import parse_filter
from ..filters.predicate import Predicate, compile_predicate
from ..filters.tree import (
    TIME_OPERATORS,
    And,
    Comparison,
    Node,
    Not,
    Or,
    bind_me,
    fields_read,
    uses_me,
    uses_time,
)
from ..store.base import View

__all__ = [
    "ALL_FIELDS",
    "FIELD_BITS",
    "CompiledView",
    "changed_fields",
    "compile_view",
]

#: One bit per field a change can touch; every ``custom.<key>`` shares the ``custom`` bit.
FIELD_BITS: Final = {name: 1 << i for i, name in enumerate((*FIELDS, "custom"))}
ALL_FIELDS: Final = (1 << len(FIELD_BITS)) - 1


def _make_changed_fields() -> Callable[[Image, Image], int]:
    lines = ["def changed_fields(b, a):", "    m = 0"]
    for name, bit in FIELD_BITS.items():
        lines.append(f"    if b.{name} is not a.{name} and b.{name} != a.{name}: m |= {bit}")
    lines.append("    return m")
    namespace: dict[str, object] = {}
    exec("\n".join(lines), namespace)
    function = namespace["changed_fields"]
    function.__doc__ = "Bit mask of the fields that differ between two images of one conversation."
    return function  # type: ignore[return-value]


changed_fields = _make_changed_fields()

GroupFn = Callable[[Image], frozenset[str]]


def _group_fn(name: str) -> GroupFn:
    if name.startswith("custom."):
        key = name[7:]

        def custom_group(image: Image) -> frozenset[str]:
            value = image.custom.get(key)
            return frozenset() if value is None else frozenset((group_text(value),))

        return custom_group
    if FIELDS[name].kind.multi:

        def set_group(image: Image) -> frozenset[str]:
            return frozenset(group_text(v) for v in getattr(image, name))

        return set_group

    def scalar_group(image: Image) -> frozenset[str]:
        value = getattr(image, name)
        return frozenset() if value is None else frozenset((group_text(value),))

    return scalar_group


def _me_fields(node: Node) -> frozenset[str]:
    """The teammate fields ``$me`` is compared with: who a conversation 'names' for this view."""
    match node:
        case Comparison(field=name, me=True):
            return frozenset((name,))
        case Comparison():
            return frozenset()
        case And(children) | Or(children):
            return frozenset().union(*(_me_fields(c) for c in children))
        case Not(child):
            return _me_fields(child)
    raise AssertionError(node)


def _timers(node: Node) -> frozenset[tuple[str, int]]:
    match node:
        case Comparison(field=name, op=op, value=span) if op in TIME_OPERATORS:
            return frozenset(((name, span),))
        case Comparison():
            return frozenset()
        case And(children) | Or(children):
            return frozenset().union(*(_timers(c) for c in children))
        case Not(child):
            return _timers(child)
    raise AssertionError(node)


def _bits(names: frozenset[str]) -> int:
    mask = 0
    for name in names:
        mask |= FIELD_BITS["custom" if name.startswith("custom.") else name]
    return mask


@dataclass(slots=True, eq=False)
class CompiledView:
    """Everything the engine needs about one view, computed once when the view is installed.

    A personal view has exactly one viewer, so its ``$me`` is bound to the owner and it counts
    like any other view. A shared view that uses ``$me`` (``per_teammate``) keeps a base count
    (``$me`` = nobody) plus, per teammate, an adjustment that only conversations naming that
    teammate in ``me_fields`` can change.
    """

    view: View
    id: int
    tree: Node
    predicate: Predicate
    group: GroupFn | None
    reads: int
    per_teammate: bool
    me_fields: tuple[str, ...]
    timed: bool
    #: (timestamp field, span µs) of each ``older_than``/``newer_than``: membership can only
    #: flip at ``image.field + span``
    timers: frozenset[tuple[str, int]] = frozenset()
    #: 0 plain, 1 grouped, 2 per teammate: one int test in the engine's hot loop
    mode: int = 0
    # Scratch state owned by the index/engine: ``tick`` de-duplicates candidates of one
    # change, ``side`` says which image (1 before, 2 after, 3 both) may match, ``exact`` that
    # the view's necessary condition is a single conjunction (so ``side`` is reliable).
    tick: int = field(default=0)
    side: int = field(default=3)
    exact: bool = field(default=False)

    def copy(self) -> CompiledView:
        """The same compiled view with scratch state of its own, for another engine (the
        predicate and group function are pure: shared; compiling again costs ~0.3 ms)."""
        return replace(self, tick=0, side=3, exact=False)


def compile_view(view: View) -> CompiledView:
    tree = parse_filter(view.filter)
    if view.owner_id is not None:
        tree = bind_me(tree, view.owner_id)
    read = fields_read(tree) | ({view.group_by} if view.group_by else frozenset())
    per_teammate = uses_me(tree)
    me_fields = tuple(sorted(_me_fields(tree))) if per_teammate else ()
    assert all(FIELDS[f].kind in (FieldKind.TEAMMATE, FieldKind.TEAMMATES) for f in me_fields)
    group = _group_fn(view.group_by) if view.group_by else None
    return CompiledView(
        view=view,
        id=view.id,
        tree=tree,
        predicate=compile_predicate(tree),
        group=group,
        reads=_bits(read),
        per_teammate=per_teammate,
        me_fields=me_fields,
        timed=uses_time(tree),
        timers=_timers(tree),
        mode=2 if per_teammate else 1 if group else 0,
    )
