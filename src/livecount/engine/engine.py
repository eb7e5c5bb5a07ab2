"""The counter engine: before/after image of a conversation → count deltas. Pure, no I/O."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from itertools import chain, compress, islice, repeat
from operator import attrgetter, not_
from typing import Any, Final

from ..domain import FIELDS, NOBODY, Image, group_text
from ..filters.predicate import Predicate, compile_predicate
from ..filters.tree import NEGATIONS, And, Comparison, Node, Not, Or, fields_read
from ..store.base import Counts, View
from .index import KEY_ORDER, ViewIndex
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

    def __init__(self, views: Iterable[View | CompiledView] = ()) -> None:
        """An engine counting ``views``; compiled views (another engine's) are copied, not
        compiled again."""
        self.views: dict[int, CompiledView] = {}
        self._tick = 0
        self._plans: dict[int, tuple[ViewIndex, ...]] = {}
        self._count_plans: dict[frozenset[int] | None, _CountPlan] = {}
        self._all = ViewIndex(())
        self._by_bit: dict[int, ViewIndex] = {}
        for view in views:
            self.views[view.id] = (view.copy() if isinstance(view, CompiledView)
                                   else compile_view(view))
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

        Exactly the sum of ``deltas(None, image, now)`` over the images (restricted to those
        views), computed in one batched pass: images are put in the buckets of the views'
        index keys, and each view is evaluated on its own buckets only, with its filter
        specialised to each bucket (see :class:`_CountPlan`). Each id counts once.
        """
        counts: Counts = {}
        plan = self._count_plan(view_ids)
        iterator = iter(images)
        while chunk := list(islice(iterator, COUNT_CHUNK)):
            plan.run(chunk, now, counts)
        return counts

    def count_into(self, counts: Counts, images: Iterable[Image], now: int,
                   view_ids: Iterable[int] | None = None) -> Counts:
        """Add the counts of ``view_ids`` (default: every view) over ``images`` to ``counts``
        and return it (keys whose count becomes 0 are removed).

        One slice of a :meth:`count`: counting a snapshot slice by slice into one dict
        (yielding to an event loop in between) gives exactly ``count`` of the whole. The plan
        for a set of views is built on the first call and kept until the views change, so a
        slice costs only its counting; the views must not change between the slices of one
        count. Slices of a few thousand images cost a few percent more than one pass.
        """
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

_ONE: Final = 0  # a view's candidates are one bucket
_DISJOINT: Final = 1  # several buckets of one single-valued shape: no image is in two
_OVERLAP: Final = 2  # buckets that may share images: each image counts in the first only
_EVERYTHING: Final = 3  # no usable index condition: every image is a candidate

_CUSTOM: Final = attrgetter("custom")
_NUMBER_TYPES: Final = frozenset({bool, int, float})
_FEW_VALUES: Final = 256
#: Smallest bucket worth tallying values for (below it, evaluating each image is cheaper).
_BY_VALUE_AT: Final = 64
_UNSEEN: Final[Any] = object()

#: A view's filter on the images of one of its buckets: True (all match), False (none), or
#: the predicate of what is left once the values the bucket's key pins are substituted.
Residual = Predicate | bool
#: An index key as :class:`_CountPlan` names it: (shape slot, key in the shape's table).
_Key = tuple[int, Any]


class _Tally:
    """How :class:`_CountPlan` counts one view: its buckets and its filter on each."""

    __slots__ = ("by_value", "constant", "group_kind", "group_of", "me_counter", "me_fields",
                 "me_multi", "me_one", "memo", "memo_now", "mode", "parts", "predicate",
                 "texts", "union", "vid", "view")

    def __init__(self, view: CompiledView, parts: list[tuple[_Key, Residual]],
                 union: int) -> None:
        self.view = view
        self.vid = view.id
        self.predicate = view.predicate
        self.mode = view.mode
        self.parts = parts
        self.union = union
        #: (union _ONE, plain counts) the one field the residual filter reads besides those
        #: the key pins: on the bucket it depends on that field's value alone; set when
        #: other views share the bucket and the field, which then pay one tally of its values
        self.by_value: str | None = None
        #: (by_value) the filter's answer per (type, value) of that field, at ``memo_now``:
        #: kept across the slices of a count
        self.memo: dict[tuple[type, Any], bool] = {}
        self.memo_now: int | None = None
        #: group value → its text, kept across slices
        self.texts: dict[Any, str] = {}
        #: (union _ONE) the residual filter reads only fields the key pins: it is a constant
        #: on the bucket, evaluated on one image
        self.constant = False
        #: (a shared ``$me`` view, union _ONE) the residual filter is just ``field = $me`` or
        #: ``field contains $me``: the adjustments are the tally of that field's values
        self.me_counter = False
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
    agree on the fields split on above it (equal values, or a common element)."""

    __slots__ = ("finals", "leaf", "multis", "splits")

    def __init__(self) -> None:
        #: index keys whose bucket is exactly this node's images
        self.finals: list[_Key] = []
        #: single-valued getter, value → child node
        self.splits: list[tuple[Callable[[Image], Any], dict[Any, _Node]]] = []
        #: multi-valued getter, element → child node (an image goes to each of its elements)
        self.multis: list[tuple[Callable[[Image], frozenset[Any]], dict[Any, _Node]]] = []
        #: nothing below: the node only names buckets
        self.leaf = True


def _build_trie(pending: list[tuple[_Key, tuple[tuple[str, Any, bool], ...]]]) -> _Node:
    """The trie of index keys, each given with its (field, value, multi-valued) steps."""
    node = _Node()
    splits: dict[str, dict[Any, list[Any]]] = {}
    multis: dict[str, dict[Any, list[Any]]] = {}
    for full, steps in pending:
        if not steps:
            node.finals.append(full)
            continue
        (name, value, multi), rest = steps[0], steps[1:]
        (multis if multi else splits).setdefault(name, {}).setdefault(value, []).append(
            (full, rest))
    node.splits = [(attrgetter(name), {value: _build_trie(items)
                                       for value, items in children.items()})
                   for name, children in splits.items()]
    node.multis = [(attrgetter(name), {value: _build_trie(items)
                                       for value, items in children.items()})
                   for name, children in multis.items()]
    node.leaf = not node.splits and not node.multis
    return node


def _fill(node: _Node, images: list[Image], found: dict[_Key, list[Image]]) -> None:
    """Put ``images`` (all of which reached ``node``) into the buckets at and below it.

    Buckets are made for the values present only (a value no key pins is remembered as
    None), so a small slice of images costs little whatever the number of keys."""
    for full in node.finals:
        found[full] = images
    for getter, children in node.splits:
        buckets: dict[Any, list[Image] | None] = {}
        get = buckets.get
        for image, value in zip(images, map(getter, images), strict=True):
            bucket = get(value, _UNSEEN)
            if bucket is _UNSEEN:
                bucket = buckets[value] = [] if value in children else None
            if bucket is not None:
                bucket.append(image)
        _descend(children, buckets, found)
    for elements, children in node.multis:
        buckets = {}
        get = buckets.get
        for image, values in zip(images, map(elements, images), strict=True):
            for value in values:
                bucket = get(value, _UNSEEN)
                if bucket is _UNSEEN:
                    bucket = buckets[value] = [] if value in children else None
                if bucket is not None:
                    bucket.append(image)
        _descend(children, buckets, found)


def _descend(children: dict[Any, _Node], buckets: dict[Any, list[Image] | None],
             found: dict[_Key, list[Image]]) -> None:
    for value, bucket in buckets.items():
        if bucket is not None:
            child = children[value]
            if child.leaf:
                for full in child.finals:
                    found[full] = bucket
            else:
                _fill(child, bucket, found)


class _CountPlan:
    """From-scratch counts of a set of views, batched (see :meth:`Engine.count_into`).

    A chunk of images is first put into the buckets of the views' index keys, through a trie
    that splits on one field at a time (the fields most keys share first, so ``state`` is
    read once per image, not once per shape, and a level only sees the images whose values
    some key above it pins). Then each view runs over the buckets of its own keys only, with
    its filter *specialised* to each bucket: the comparisons the key already decides are
    substituted (``state = 'open'`` on the ``state = 'open'`` bucket is true), so a view
    whose filter the key decides costs ``len(bucket)``, and the rest is mapped over the whole
    bucket at once (``sum(map(...))``, no Python loop per image, no delta tuples). Views that
    share a bucket and depend there on one field's value alone (``custom.seats >= N``) are
    evaluated once per distinct value. Grouped views tally their groups with a
    :class:`~collections.Counter`; shared ``$me`` views add the per-teammate adjustments of
    each image (as :meth:`Engine._per_teammate` does), by a tally when the filter is just
    ``field = $me`` on the bucket.
    """

    def __init__(self, index: ViewIndex, views: Iterable[CompiledView]) -> None:
        keys_of: dict[int, list[_Key]] = {}
        shapes = list(index.shapes.values())
        usage = Counter(name for shape in shapes for name in shape.fields)

        def rank(name: str) -> tuple[int, int]:  # shared multi-valued splits cost the most
            weight = 3 if FIELDS[name].kind.multi else 1
            return (-usage[name] * weight, KEY_ORDER.index(name))

        pending: list[tuple[_Key, tuple[tuple[str, Any, bool], ...]]] = []
        known: dict[_Key, dict[str, Any]] = {}
        for slot, shape in enumerate(shapes):
            order = sorted(range(len(shape.fields)), key=lambda i: rank(shape.fields[i]))
            for key, bucket in shape.table.items():
                values = _key_values(shape, key)
                steps = tuple((shape.fields[i], values[i], shape.fields[i] == shape.multi)
                              for i in order)
                pending.append(((slot, key), steps))
                known[slot, key] = dict(zip(shape.fields, values, strict=True))
                for view in bucket:
                    keys_of.setdefault(id(view), []).append((slot, key))
        self.root = _build_trie(pending)
        multi_slots = {slot for slot, shape in enumerate(shapes) if shape.multi is not None}
        unindexed = {id(v) for v in index.unindexed}
        self.tallies: list[_Tally] = []
        sharing: Counter[tuple[_Key, str]] = Counter()
        for view in views:
            keys = keys_of.get(id(view), [])
            if id(view) in unindexed or not keys:
                self.tallies.append(_Tally(view, [], _EVERYTHING))
                continue
            if len(keys) == 1:
                union = _ONE
            elif len({s for s, _ in keys}) == 1 and keys[0][0] not in multi_slots:
                union = _DISJOINT
            else:
                union = _OVERLAP
            trees = [_specialise(view.tree, known[key]) for key in keys]
            tally = _Tally(view, [(key, tree if isinstance(tree, bool)
                                   else compile_predicate(tree))
                                  for key, tree in zip(keys, trees, strict=True)], union)
            self.tallies.append(tally)
            tree = trees[0]
            if union != _ONE or isinstance(tree, bool):
                continue
            if view.mode == 2:
                tally.me_counter = (
                    tally.group_kind < 0 and isinstance(tree, Comparison) and tree.me
                    and tree.value is None and tree.op in ("=", "contains")
                    and view.me_fields == (tree.field,))
                continue
            pinned = {name for name in known[keys[0]] if not FIELDS[name].kind.multi}
            rest = fields_read(tree) - pinned
            if not rest:
                tally.constant = True
            elif len(rest) == 1 and view.mode == 0:
                tally.by_value = next(iter(rest))
                sharing[keys[0], tally.by_value] += 1
        for tally in self.tallies:
            if tally.by_value is not None and sharing[tally.parts[0][0], tally.by_value] < 2:
                tally.by_value = None

    def run(self, images: Iterable[Image], now: int, counts: Counts) -> None:
        """Add the counts of the plan's views over ``images`` to ``counts``."""
        if not isinstance(images, list):
            images = list(images)
        if not images:
            return
        found: dict[_Key, list[Image]] = {}
        _fill(self.root, images, found)
        empty: list[Image] = []
        values: dict[tuple[_Key, str], _Values | None] = {}
        for tally in self.tallies:
            union, mode = tally.union, tally.mode
            if union == _EVERYTHING:
                if mode == 2:
                    _add_per_teammate(counts, tally, images, tally.predicate, now)
                elif mode == 1:
                    _add_groups(counts, tally, _matching(images, tally.predicate, now))
                else:
                    _bump(counts, (tally.vid, None, None),
                          _how_many(images, tally.predicate, now))
                continue
            if union == _ONE:
                key, residual = tally.parts[0]
                pool = found.get(key, empty)
                if not pool or residual is False:
                    continue
                if mode == 2:
                    if tally.me_counter and _add_me_tally(counts, tally, pool):
                        continue
                    _add_per_teammate(counts, tally, pool, residual, now)
                elif mode == 1:
                    _add_groups(counts, tally, _matching(pool, residual, now))
                elif residual is True:
                    _bump(counts, (tally.vid, None, None), len(pool))
                elif tally.constant:
                    if residual(pool[0], NOBODY, now):
                        _bump(counts, (tally.vid, None, None), len(pool))
                elif tally.by_value is not None and len(pool) >= _BY_VALUE_AT:
                    where = (key, tally.by_value)
                    if where not in values:
                        values[where] = _tally_values(pool, tally.by_value)
                    tallied = values[where]
                    if tallied is None:  # too many values, or values dict keys would confuse
                        n = _how_many(pool, residual, now)
                    else:
                        n = _count_by_value(tally, residual, pool, tallied, now)
                    _bump(counts, (tally.vid, None, None), n)
                else:
                    _bump(counts, (tally.vid, None, None), _how_many(pool, residual, now))
                continue
            if mode == 2:  # several buckets: the whole filter over their union
                lists = [found.get(key, empty) for key, _ in tally.parts]
                pool = list(dict(zip(map(id, chain.from_iterable(lists)),
                                     chain.from_iterable(lists), strict=True)).values())
                if pool:
                    _add_per_teammate(counts, tally, pool, tally.predicate, now)
                continue
            seen: set[int] = set()
            n = 0
            matched: list[Image] = []
            for key, residual in tally.parts:
                pool = found.get(key, empty)
                if not pool:
                    continue
                if union == _OVERLAP:  # count each image in the first bucket it is in
                    if seen:
                        pool = list(compress(pool, map(not_, map(seen.__contains__,
                                                                 map(id, pool)))))
                    seen.update(map(id, pool))
                if residual is False or not pool:
                    continue
                if mode == 1:
                    matched += _matching(pool, residual, now)
                else:
                    n += _how_many(pool, residual, now)
            if mode == 1:
                _add_groups(counts, tally, matched)
            else:
                _bump(counts, (tally.vid, None, None), n)


def _key_values(shape: Any, key: Any) -> tuple[Any, ...]:
    """A shape's table key as one value per field of ``shape.fields`` (see ``_Shape.key``)."""
    if shape.multi is None:
        return (key,) if len(shape.fields) == 1 else tuple(key)
    if shape.single is None:
        return (key,)
    prefix, element = key
    return (*((prefix,) if len(shape.fields) == 2 else prefix), element)


def _specialise(node: Node, known: dict[str, Any]) -> Node | bool:
    """``node`` on the images of one bucket: every image has ``known[field]`` as the value
    of each single-valued field the key pins, and contains ``known[field]`` for a
    multi-valued one. Comparisons those facts decide become True/False and fold away; the
    rest (``$me``, ranges, text, ``custom.*``…) is kept as it is."""
    match node:
        case Comparison(me=False, field=name, op=op, value=value) if name in known:
            pinned = known[name]
            positive = NEGATIONS.get(op, op)
            negate = positive != op
            if FIELDS[name].kind.multi:
                if positive == "contains" and value == pinned:
                    return not negate
                return node
            if positive == "=":
                return bool(pinned == value) != negate
            if positive == "IN":
                return (pinned in frozenset(value)) != negate
            if positive == "is null":
                return (pinned is None) != negate
            return node
        case Comparison():
            return node
        case And(children):
            kept: list[Node] = []
            for child in children:
                part = _specialise(child, known)
                if part is False:
                    return False
                if part is not True:
                    kept.append(part)
            return True if not kept else kept[0] if len(kept) == 1 else And(tuple(kept))
        case Or(children):
            kept = []
            for child in children:
                part = _specialise(child, known)
                if part is True:
                    return True
                if part is not False:
                    kept.append(part)
            return False if not kept else kept[0] if len(kept) == 1 else Or(tuple(kept))
        case Not(child):
            part = _specialise(child, known)
            return (not part) if isinstance(part, bool) else Not(part)
    raise AssertionError(node)


def _matching(pool: Sequence[Image], residual: Residual, now: int) -> Sequence[Image]:
    if residual is True:
        return pool
    if residual is False:
        return []
    return list(compress(pool, map(residual, pool, repeat(NOBODY), repeat(now))))


def _how_many(pool: Sequence[Image], residual: Residual, now: int) -> int:
    if residual is True:
        return len(pool)
    if residual is False:
        return 0
    return sum(map(residual, pool, repeat(NOBODY), repeat(now)))


#: How many images of a bucket have each value of a field, and the values image by image.
_Values = tuple[Counter[Any], list[Any]]


def _tally_values(pool: Sequence[Image], field: str) -> _Values | None:
    """The values of ``field`` over ``pool`` with how many images have each; None when there
    are too many distinct ones to gain anything, or two values of different types could be
    equal as dict keys (``True == 1 == 1.0`` in a custom field), which a filter tells apart."""
    if field.startswith("custom."):
        found = list(map(dict.get, map(_CUSTOM, pool), repeat(field[7:])))
        if len(_NUMBER_TYPES.intersection(map(type, found))) > 1:
            return None
    else:
        found = list(map(attrgetter(field), pool))
    tallied = Counter(found)
    return None if len(tallied) > _FEW_VALUES else (tallied, found)


def _count_by_value(tally: _Tally, residual: Predicate, pool: Sequence[Image],
                    tallied: _Values, now: int) -> int:
    """Images of ``pool`` the residual filter matches, evaluating it once per distinct value
    of the one field it depends on (on an image that has that value), memoised per view."""
    memo = tally.memo
    if tally.memo_now != now or len(memo) > 16 * _FEW_VALUES:
        memo.clear()
        tally.memo_now = now
    counter, found = tallied
    answers = list(map(memo.get, zip(map(type, counter), counter, strict=True)))
    if None in answers:
        for i, value in enumerate(counter):
            if answers[i] is None:
                answer = memo[type(value), value] = residual(pool[found.index(value)], NOBODY,
                                                             now)
                answers[i] = answer
    return sum(compress(counter.values(), answers))


def _bump(counts: Counts, key: tuple[int, str | None, int | None], n: int) -> None:
    if not n:
        return
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
    vid, texts, get = tally.vid, tally.texts, counts.get
    for value, n in values.items():
        if value is None:
            continue
        if kind == _TEXT_GROUP:
            text = value
        else:
            text = texts.get(value)
            if text is None:
                text = texts[value] = group_text(value)
        key = (vid, text, None)
        total = get(key, 0) + n
        if total:
            counts[key] = total
        else:
            del counts[key]


def _add_me_tally(counts: Counts, tally: _Tally, pool: Sequence[Image]) -> bool:
    """A shared view whose filter on this bucket is just ``field = $me`` (or ``field
    contains $me``): nobody matches, and each teammate gains one per image naming them.
    False (nothing added) when an image names NOBODY itself, which the general path covers."""
    one = tally.me_one
    assert one is not None
    named = Counter(chain.from_iterable(map(one, pool)) if tally.me_multi else map(one, pool))
    if NOBODY in named:
        return False
    vid, get = tally.vid, counts.get
    for teammate, n in named.items():
        if teammate is not None:
            key = (vid, None, teammate)
            total = get(key, 0) + n
            if total:
                counts[key] = total
            else:
                del counts[key]
    return True


def _add_per_teammate(counts: Counts, tally: _Tally, pool: Sequence[Image],
                      predicate: Residual, now: int) -> None:
    """A shared ``$me`` view: base counts (``$me`` = nobody) plus, per image, the adjustment
    f(image, T) - f(image, nobody) of each teammate T the image names."""
    vid = tally.vid
    grouped = tally.group_kind >= 0
    if isinstance(predicate, bool):  # the filter does not depend on $me here
        if predicate:
            if grouped:
                _add_groups(counts, tally, pool)
            else:
                _bump(counts, (vid, None, None), len(pool))
        return
    seen = list(map(predicate, pool, repeat(NOBODY), repeat(now)))
    if grouped:
        _add_groups(counts, tally, list(compress(pool, seen)))
    else:
        _bump(counts, (vid, None, None), sum(seen))
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
        _bump(counts, (vid, *where) if group is not None else (vid, None, where), n)
