"""The counter engine: before/after image of a conversation → count deltas. Pure, no I/O."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from itertools import chain, compress, islice, repeat
from operator import attrgetter, methodcaller
from typing import Any, Final

from ..domain import FIELDS, NOBODY, Image, group_text
from ..filters.tree import And, Comparison, Node, fields_read
from ..store.base import Counts, View
from .index import KEY_ORDER, MAX_ATOMS, ViewIndex, necessary_condition
from .views import ALL_FIELDS, FIELD_BITS, CompiledView, changed_fields, compile_view

__all__ = ["Delta", "Engine"]

#: (view id, group value or None, teammate id or None, +n/-n). Teammate None: the base count
#: every viewer sees; a teammate id: that teammate's adjustment of a ``$me`` view.
Delta = tuple[int, str | None, int | None, int]

_BITS: Final = tuple(FIELD_BITS.values())
_EMPTY: Final[frozenset[str]] = frozenset()


class Engine:
    """Incremental counts for the views of one workspace.

    The engine keeps no per-conversation state (a version map would grow with the data):
    idempotence belongs to the caller, which applies outbox entries in order and skips any at
    or below the position its counts already reflect (see :mod:`livecount.relay`).
    """

    def __init__(self, views: Iterable[View] = ()) -> None:
        self.views: dict[int, CompiledView] = {}
        self._tick = 0
        self._plans: dict[int, tuple[ViewIndex, ...]] = {}
        self._count_plans: dict[frozenset[int] | None, _CountPlan] = {}
        self._all = ViewIndex(())
        self._by_bit: dict[int, ViewIndex] = {}
        for view in views:
            self.views[view.id] = compile_view(view)
        self._reindex()

    # -- views ------------------------------------------------------------------------------

    def set_view(self, view: View) -> CompiledView:
        """Install or replace a view (its counts must come from a recount: see ``count``)."""
        compiled = self.views[view.id] = compile_view(view)
        self._reindex()
        return compiled

    def remove_view(self, view_id: int) -> None:
        if self.views.pop(view_id, None) is not None:
            self._reindex()

    def _reindex(self) -> None:
        views = list(self.views.values())
        self._all = ViewIndex(views)
        self._by_bit = {}
        for bit in _BITS:
            readers = [v for v in views if v.reads & bit]
            if readers:
                self._by_bit[bit] = ViewIndex(readers)
        self._plans = {}
        self._count_plans = {}

    def _plan(self, mask: int) -> tuple[ViewIndex, ...]:
        """The indexes to consult for a change touching ``mask`` (cached per mask)."""
        plan = self._plans.get(mask)
        if plan is None:
            if mask == ALL_FIELDS:
                plan = (self._all,)
            else:
                plan = tuple(idx for bit, idx in self._by_bit.items() if mask & bit)
            self._plans[mask] = plan
        return plan

    # -- changes ----------------------------------------------------------------------------

    def deltas(self, before: Image | None, after: Image | None, now: int,
               views: Iterable[CompiledView] | None = None) -> list[Delta]:
        """Deltas of one committed change: ``before`` is None for a create, ``after`` None
        for a delete. ``views``: evaluate exactly these (else the index finds candidates)."""
        if views is None:
            mask = ALL_FIELDS if before is None or after is None else changed_fields(before,
                                                                                      after)
            if not mask:
                return []
            self._tick += 1
            tick = self._tick
            candidates: list[CompiledView] = []
            for index in self._plan(mask):
                index.collect(before, after, candidates, tick)
        else:
            candidates = list(views)
            for view in candidates:
                view.side = 3
        out: list[Delta] = []
        append = out.append
        nobody = NOBODY
        if before is not None and after is not None:
            for view in candidates:
                pred = view.predicate
                side = view.side if view.exact else 3
                was = side != 2 and pred(before, nobody, now)
                now_in = side != 1 and pred(after, nobody, now)
                if view.mode == 0:
                    if was is not now_in:
                        append((view.id, None, None, 1 if now_in else -1))
                elif view.mode == 1:
                    if was or now_in:
                        _group_deltas(view, before if was else None, after if now_in else None,
                                      None, 1, out)
                else:
                    self._per_teammate(view, before, after, was, now_in, now, now, out)
            return out
        self._evaluate(candidates, before, after, now, now, out)
        return out

    def clock_deltas(self, image: Image, earlier: int, later: int,
                     view_ids: Iterable[int]) -> list[Delta]:
        """Deltas of some time-dependent views for one unchanged image as the clock moves
        from ``earlier`` to ``later`` (``older_than``/``newer_than`` flips)."""
        out: list[Delta] = []
        timed = [v for i in view_ids if (v := self.views.get(i)) is not None and v.timed]
        for view in timed:
            view.side = 3
        self._evaluate(timed, image, image, earlier, later, out)
        return out

    def _evaluate(self, candidates: Iterable[CompiledView], before: Image | None,
                  after: Image | None, before_now: int, after_now: int,
                  out: list[Delta]) -> None:
        append = out.append
        for view in candidates:
            pred = view.predicate
            was = before is not None and pred(before, NOBODY, before_now)
            now_in = after is not None and pred(after, NOBODY, after_now)
            if view.mode == 0:
                if was != now_in:
                    append((view.id, None, None, 1 if now_in else -1))
            elif view.mode == 1:
                if was or now_in:
                    _group_deltas(view, before if was else None, after if now_in else None,
                                  None, 1, out)
            else:
                self._per_teammate(view, before, after, was, now_in, before_now, after_now,
                                   out)

    @staticmethod
    def _per_teammate(view: CompiledView, before: Image | None, after: Image | None,
                      was: bool, now_in: bool, before_now: int, after_now: int,
                      out: list[Delta]) -> None:
        """Base delta plus adjustments for the teammates the images name (and only them)."""
        vid = view.id
        if view.group is None:
            if was != now_in:
                out.append((vid, None, None, 1 if now_in else -1))
        elif was or now_in:
            _group_deltas(view, before if was else None, after if now_in else None, None, 1,
                          out)
        named: set[int] = set()
        for image in (before, after):
            if image is None:
                continue
            for name in view.me_fields:
                value = getattr(image, name)
                if isinstance(value, frozenset):
                    named.update(value)
                elif value is not None:
                    named.add(value)
        pred = view.predicate
        for teammate in named:
            # adjustment(T) for one image = f(image, T) - f(image, nobody)
            b_me = before is not None and pred(before, teammate, before_now)
            a_me = after is not None and pred(after, teammate, after_now)
            if view.group is None:
                delta = (a_me - now_in) - (b_me - was)
                if delta:
                    out.append((vid, None, teammate, delta))
                continue
            # grouped: +1 per group of a_me image, -1 per group of after-as-nobody, etc.
            _group_deltas(view, before if b_me else None, after if a_me else None, teammate,
                          1, out)
            _group_deltas(view, before if was else None, after if now_in else None, teammate,
                          -1, out)

    # -- recounts ---------------------------------------------------------------------------

    def count(self, images: Iterable[Image], now: int,
              view_ids: Iterable[int] | None = None) -> Counts:
        """Counts of ``view_ids`` (default: every view) over ``images``, from scratch.

        Equal to summing ``deltas(None, image, now)`` over the images, but batched: images
        are bucketed by the index's keys, then each view is evaluated on its own buckets only
        (see :meth:`count_into`).
        """
        counts: Counts = {}
        plan = self._count_plan(view_ids)
        iterator = iter(images)
        while chunk := list(islice(iterator, COUNT_CHUNK)):
            plan.run(chunk, now, counts)
        return counts

    def count_into(self, counts: Counts, images: Sequence[Image], now: int,
                   view_ids: Iterable[int] | None = None) -> Counts:
        """Add the counts of ``view_ids`` (default: every view) over ``images`` to ``counts``
        and return it: one slice of a :meth:`count`, so a caller can count a large snapshot
        in chunks (yielding to its event loop in between) and get exactly what ``count`` of
        the whole gives. Keys whose count becomes 0 are removed. The plan for a set of views
        is cached until the views change, so repeated calls cost only the counting."""
        self._count_plan(view_ids).run(images, now, counts)
        return counts

    def _count_plan(self, view_ids: Iterable[int] | None) -> _CountPlan:
        if view_ids is None:
            key: frozenset[int] | None = None
        else:
            key = frozenset(view_ids)
            for view_id in key:
                if view_id not in self.views:
                    raise KeyError(view_id)
            if len(key) == len(self.views):
                key = None
        plan = self._count_plans.get(key)
        if plan is None:
            if len(self._count_plans) >= 8:
                self._count_plans.clear()
            if key is None:
                plan = _CountPlan(self._all, self.views.values())
            else:
                chosen = [v for v in self.views.values() if v.id in key]
                plan = _CountPlan(ViewIndex(chosen), chosen)
            self._count_plans[key] = plan
        return plan

def _group_deltas(view: CompiledView, before: Image | None, after: Image | None,
                  teammate: int | None, sign: int, out: list[Delta]) -> None:
    """Per-group deltas of leaving ``before``'s groups and joining ``after``'s (None: none)."""
    group = view.group
    assert group is not None
    old = group(before) if before is not None else _EMPTY
    new = group(after) if after is not None else _EMPTY
    if old == new:
        return
    vid = view.id
    for value in old - new:
        out.append((vid, value, teammate, -sign))
    for value in new - old:
        out.append((vid, value, teammate, sign))


# -- batched counting -------------------------------------------------------------------------

#: Images bucketed at once by :meth:`Engine.count` (bounds the memory of the buckets).
COUNT_CHUNK: Final = 65_536

_SCALAR_GROUP: Final = 0  # group by a single-valued field: one value per image (or None)
_MULTI_GROUP: Final = 1  # a multi-valued field: each element is a group
_TEXT_GROUP: Final = 2  # custom.<key>: the view's own group function (text forms)

_CUSTOM: Final = attrgetter("custom")

_ONE: Final = 0  # a view's candidates are one bucket
_DISJOINT: Final = 1  # several buckets of one single-valued shape: no image is in two
_OVERLAP: Final = 2  # buckets that may share images: de-duplicate
_EVERYTHING: Final = 3  # no usable index condition: every image is a candidate


class _Tally:
    """How :class:`_CountPlan` counts one view."""

    __slots__ = ("by_value", "constant", "exact", "group_kind", "group_of", "keys",
                 "me_fields", "me_multi", "me_one", "mode", "predicate", "union", "vid", "view")

    def __init__(self, view: CompiledView, keys: list[tuple[int, Any]], union: int,
                 exact: bool) -> None:
        self.view = view
        self.vid = view.id
        self.predicate = view.predicate
        self.mode = view.mode
        self.keys = keys
        self.union = union
        #: the view's filter is exactly its index key (a conjunction of pinned values, none
        #: trimmed): every image of its bucket matches, no evaluation needed
        self.exact = exact
        #: the one field the filter reads besides the single-valued fields its key pins (so
        #: on its bucket the filter depends on that field's value alone); set when other
        #: views share the bucket and the field, which then pay one tally of its values
        self.by_value: str | None = None
        #: the filter reads nothing but the single-valued fields its key pins: on its bucket
        #: it is a constant, evaluated on one image
        self.constant = False
        self.group_kind = -1
        self.group_of: Callable[[Image], Any] | None = None
        name = view.view.group_by
        if name is not None:
            if name.startswith("custom."):
                self.group_kind, self.group_of = _TEXT_GROUP, view.group
            elif FIELDS[name].kind.multi:
                self.group_kind, self.group_of = _MULTI_GROUP, attrgetter(name)
            else:
                self.group_kind, self.group_of = _SCALAR_GROUP, attrgetter(name)
        self.me_fields = tuple((attrgetter(f), FIELDS[f].kind.multi) for f in view.me_fields)
        #: the common ``$me`` case: one field (``assignee_id = $me``, ``mentions contains
        #: $me``), and whether it is multi-valued
        self.me_one: Callable[[Image], Any] | None = (
            attrgetter(view.me_fields[0]) if len(view.me_fields) == 1 else None)
        self.me_multi = len(view.me_fields) == 1 and FIELDS[view.me_fields[0]].kind.multi


class _Node:
    """One level of the bucketing trie of a :class:`_CountPlan`: the images that reach it
    agree on the values of the fields split on above it."""

    __slots__ = ("finals", "multis", "splits")

    def __init__(self) -> None:
        #: index keys (slot, key) whose bucket is exactly this node's images
        self.finals: list[tuple[int, Any]] = []
        #: multi-valued getter, element → index key: one bucket per element
        self.multis: list[tuple[Callable[[Image], frozenset[Any]], dict[Any, tuple[int, Any]]]]
        self.multis = []
        #: single-valued getter, value → child node
        self.splits: list[tuple[Callable[[Image], Any], dict[Any, _Node]]] = []


#: One index key of a shape still to place in the trie: (its full key, the (field, value)
#: pairs not split on yet (single-valued fields, in split order), the multi-valued field or
#: None, the element it must contain).
_Pending = tuple[tuple[int, Any], tuple[tuple[str, Any], ...], str | None, Any]


def _build_trie(pending: list[_Pending]) -> _Node:
    node = _Node()
    multis: dict[str, dict[Any, tuple[int, Any]]] = {}
    splits: dict[str, dict[Any, list[_Pending]]] = {}
    for full, singles, multi, element in pending:
        if singles:
            (name, value), rest = singles[0], singles[1:]
            splits.setdefault(name, {}).setdefault(value, []).append((full, rest, multi,
                                                                      element))
        elif multi is None:
            node.finals.append(full)
        else:
            multis.setdefault(multi, {})[element] = full
    node.multis = [(attrgetter(name), table) for name, table in multis.items()]
    node.splits = [(attrgetter(name), {value: _build_trie(items)
                                       for value, items in children.items()})
                   for name, children in splits.items()]
    return node


def _fill(node: _Node, images: list[Image], found: dict[tuple[int, Any], list[Image]]) -> None:
    """Put ``images`` (all of which reached ``node``) into the buckets below ``node``."""
    for full in node.finals:
        found[full] = images
    for elements, table in node.multis:
        buckets: dict[Any, list[Image]] = {element: [] for element in table}
        get = buckets.get
        for image, values in zip(images, map(elements, images), strict=True):
            for value in values:
                bucket = get(value)
                if bucket is not None:
                    bucket.append(image)
        for element, bucket in buckets.items():
            if bucket:
                found[table[element]] = bucket
    for getter, children in node.splits:
        buckets = {value: [] for value in children}
        get = buckets.get
        for image, value in zip(images, map(getter, images), strict=True):
            bucket = get(value)
            if bucket is not None:
                bucket.append(image)
        for value, bucket in buckets.items():
            if bucket:
                _fill(children[value], bucket, found)


class _CountPlan:
    """From-scratch counts of a set of views, batched (see :meth:`Engine.count_into`).

    A chunk of images is first put into the buckets of the views' index keys, through a trie
    of the index's shapes that splits on one field at a time (fields most shapes share first,
    so ``state`` is read once per image, not once per shape, and a level only looks at the
    images whose values some key above it pins); then each view runs over the buckets of its
    own keys only: its predicate is mapped over a whole bucket (``sum(map(...))``, no
    per-image loop in Python and no delta tuples), and a view whose filter is exactly its key
    is not evaluated at all. Grouped views tally their group values with a
    :class:`~collections.Counter`; shared ``$me`` views add, per image, the adjustment of each
    teammate the image names (as :meth:`Engine._per_teammate` does).
    """

    def __init__(self, index: ViewIndex, views: Iterable[CompiledView]) -> None:
        keys_of: dict[int, list[tuple[int, Any]]] = {}
        multi_slots: set[int] = set()
        shapes = list(index.shapes.values())
        usage = Counter(name for shape in shapes for name in shape.fields)
        pending: list[_Pending] = []
        for slot, shape in enumerate(shapes):
            if shape.multi is not None:
                multi_slots.add(slot)
            order = sorted((i for i, name in enumerate(shape.fields) if name != shape.multi),
                           key=lambda i: (-usage[shape.fields[i]], KEY_ORDER.index(
                               shape.fields[i])))
            for key, bucket in shape.table.items():
                values = _key_values(shape, key)
                pending.append(((slot, key), tuple((shape.fields[i], values[i]) for i in order),
                                shape.multi, values[-1] if shape.multi is not None else None))
                for view in bucket:
                    keys_of.setdefault(id(view), []).append((slot, key))
        self.root = _build_trie(pending)
        unindexed = {id(v) for v in index.unindexed}
        self.tallies: list[_Tally] = []
        for view in views:
            keys = keys_of.get(id(view), [])
            if id(view) in unindexed or not keys:
                union = _EVERYTHING
            elif len(keys) == 1:
                union = _ONE
            elif len({s for s, _ in keys}) == 1 and keys[0][0] not in multi_slots:
                union = _DISJOINT
            else:
                union = _OVERLAP
            exact = union == _ONE and _key_exact(view)
            self.tallies.append(_Tally(view, keys, union, exact))
        # Views counted over one bucket that, there, depend on at most one field's value.
        pinned = [frozenset(f for f in shape.fields if f != shape.multi) for shape in shapes]
        sharing: Counter[tuple[tuple[int, Any], str]] = Counter()
        for tally in self.tallies:
            if tally.union != _ONE or tally.mode != 0 or tally.exact:
                continue
            rest = fields_read(tally.view.tree) - pinned[tally.keys[0][0]]
            if not rest:
                tally.constant = True
            elif len(rest) == 1:
                tally.by_value = next(iter(rest))
                sharing[tally.keys[0], tally.by_value] += 1
        for tally in self.tallies:
            if tally.by_value is not None and sharing[tally.keys[0], tally.by_value] < 2:
                tally.by_value = None

    def run(self, images: Sequence[Image], now: int, counts: Counts) -> None:
        if not images:
            return
        found: dict[tuple[int, Any], list[Image]] = {}
        _fill(self.root, list(images), found)
        nobody = repeat(NOBODY)
        at = repeat(now)
        empty: list[Image] = []
        values: dict[tuple[tuple[int, Any], str], _Values | None] = {}
        for tally in self.tallies:
            union = tally.union
            pool: Sequence[Image]
            if union == _ONE:
                pool = found.get(tally.keys[0], empty)
            elif union == _EVERYTHING:
                pool = images
            elif union == _DISJOINT:
                pool = list(chain.from_iterable(found.get(k, empty) for k in tally.keys))
            else:
                lists = [found.get(k, empty) for k in tally.keys]
                pool = list(dict(zip(map(id, chain.from_iterable(lists)),
                                     chain.from_iterable(lists), strict=True)).values())
            if not pool:
                continue
            mode = tally.mode
            if mode == 0:
                if tally.exact:
                    n = len(pool)
                elif tally.constant:
                    n = len(pool) if tally.predicate(pool[0], NOBODY, now) else 0
                elif tally.by_value is not None:
                    where = (tally.keys[0], tally.by_value)
                    if where not in values:
                        values[where] = _tally_values(pool, tally.by_value)
                    tallied = values[where]
                    if tallied is None:
                        n = sum(map(tally.predicate, pool, nobody, at))
                    else:
                        predicate = tally.predicate
                        n = sum([count for value, count in tallied[0].items()
                                 if predicate(tallied[1][value], NOBODY, now)])
                else:
                    n = sum(map(tally.predicate, pool, nobody, at))
                if n:
                    _bump(counts, (tally.vid, None, None), n)
            elif mode == 1:
                _add_groups(counts, tally, pool if tally.exact else
                            list(compress(pool, map(tally.predicate, pool, nobody, at))))
            else:
                _add_per_teammate(counts, tally, pool, now)


def _key_values(shape: Any, key: Any) -> tuple[Any, ...]:
    """A shape's table key as one value per field of ``shape.fields`` (see ``_Shape.key``)."""
    if shape.multi is None:
        return (key,) if len(shape.fields) == 1 else tuple(key)
    if shape.single is None:
        return (key,)
    prefix, element = key
    return (*((prefix,) if len(shape.fields) == 2 else prefix), element)


#: How many images of a bucket have each value of a field, and one image per value.
_Values = tuple[Counter[Any], dict[Any, Image]]
_NUMBER_TYPES: Final = frozenset({bool, int, float})


def _tally_values(pool: Sequence[Image], field: str) -> _Values | None:
    """The values of ``field`` over ``pool``, each with how many images have it and one image
    that has it; None when two values of different types could be equal as dict keys
    (``True == 1 == 1.0`` in a custom field), which the filter would tell apart."""
    if field.startswith("custom."):
        found = list(map(methodcaller("get", field[7:]), map(_CUSTOM, pool)))
        if len(_NUMBER_TYPES.intersection(map(type, found))) > 1:
            return None
    else:
        found = list(map(attrgetter(field), pool))
    return Counter(found), dict(zip(found, pool, strict=True))


def _bump(counts: Counts, key: tuple[int, str | None, int | None], n: int) -> None:
    value = counts.get(key, 0) + n
    if value:
        counts[key] = value
    else:
        counts.pop(key, None)


def _add_groups(counts: Counts, tally: _Tally, matched: Sequence[Image]) -> None:
    """Base counts of a grouped view over the images it matches."""
    if not matched:
        return
    kind, group_of = tally.group_kind, tally.group_of
    assert group_of is not None
    values: Counter[Any]
    if kind == _SCALAR_GROUP:
        values = Counter(map(group_of, matched))
    else:
        values = Counter(chain.from_iterable(map(group_of, matched)))
    vid = tally.vid
    for value, n in values.items():
        if value is not None:
            _bump(counts, (vid, value if kind == _TEXT_GROUP else group_text(value), None), n)


def _add_per_teammate(counts: Counts, tally: _Tally, pool: Sequence[Image], now: int) -> None:
    """A shared ``$me`` view: base counts (``$me`` = nobody) plus, per image, the adjustment
    f(image, T) - f(image, nobody) of each teammate T the image names."""
    predicate, vid = tally.predicate, tally.vid
    seen = list(map(predicate, pool, repeat(NOBODY), repeat(now)))
    grouped = tally.group_kind >= 0
    if grouped:
        _add_groups(counts, tally, list(compress(pool, seen)))
    else:
        n = sum(seen)
        if n:
            _bump(counts, (vid, None, None), n)
    adjust: dict[Any, int] = {}
    get = adjust.get
    one = tally.me_one
    if one is not None and not grouped:  # the common cases, kept flat
        if tally.me_multi:
            for image, was, people in zip(pool, seen, map(one, pool), strict=True):
                for teammate in people:
                    if predicate(image, teammate, now) != was:
                        adjust[teammate] = get(teammate, 0) + (-1 if was else 1)
        else:
            for image, was, teammate in zip(pool, seen, map(one, pool), strict=True):
                if teammate is not None and predicate(image, teammate, now) != was:
                    adjust[teammate] = get(teammate, 0) + (-1 if was else 1)
        for teammate, n in adjust.items():
            if n:
                _bump(counts, (vid, None, teammate), n)
        return
    group = tally.view.group
    for image, was in zip(pool, seen, strict=True):
        named: set[int] = set()
        for getter, multi in tally.me_fields:
            value = getter(image)
            if multi:
                named.update(value)
            elif value is not None:
                named.add(value)
        for teammate in named:
            if predicate(image, teammate, now) == was:
                continue
            sign = -1 if was else 1
            if group is None:
                adjust[teammate] = get(teammate, 0) + sign
            else:
                for text in group(image):
                    adjust[text, teammate] = get((text, teammate), 0) + sign
    for where, n in adjust.items():
        if n:
            _bump(counts, (vid, *where) if group is not None else (vid, None, where), n)


def _pins(node: Node) -> set[tuple[str, Any]] | None:
    """The atoms of a filter that is nothing but a conjunction of index atoms, else None."""
    match node:
        case Comparison(me=False, field=name, op=op, value=value) if name in KEY_ORDER:
            spec = FIELDS[name]
            if op == "=" and not spec.kind.multi:
                return {(name, value)}
            if op == "contains" and spec.kind.multi:
                return {(name, value)}
            if op == "is null" and spec.nullable and not spec.kind.multi:
                return {(name, None)}
            return None
        case And(children):
            atoms: set[tuple[str, Any]] = set()
            for child in children:
                part = _pins(child)
                if part is None:
                    return None
                atoms |= part
            return atoms
    return None


def _key_exact(view: CompiledView) -> bool:
    """True when the view matches exactly the images of its one index key: its filter is a
    conjunction of pinned values and the index kept every one of them in the key."""
    if view.mode == 2:
        return False
    atoms = _pins(view.tree)
    if not atoms:
        return False
    condition = necessary_condition(view.tree)
    if condition is None or len(condition) != 1 or condition[0] != atoms:
        return False
    multi = sum(1 for name, _ in atoms if FIELDS[name].kind.multi)
    return len(atoms) <= MAX_ATOMS and multi <= 1
