"""The counter engine: before/after image of a conversation → count deltas. Pure, no I/O."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Final

from ..domain import NOBODY, Image
from ..store.base import Counts, View
from .index import ViewIndex
from .views import ALL_FIELDS, FIELD_BITS, CompiledView, changed_fields, compile_view

__all__ = ["Delta", "Engine"]

#: (view id, group value or None, teammate id or None, +n/-n). Teammate None: the base count
#: every viewer sees; a teammate id: that teammate's adjustment of a ``$me`` view.
Delta = tuple[int, str | None, int | None, int]

_BITS: Final = tuple(FIELD_BITS.values())
_EMPTY: Final[frozenset[str]] = frozenset()


class Engine:
    """Incremental counts for the views of one workspace.

    ``apply`` is idempotent per (conversation, version): the engine remembers the last version
    it applied for each conversation and ignores anything not newer.
    """

    def __init__(self, views: Iterable[View] = ()) -> None:
        self.views: dict[int, CompiledView] = {}
        self.versions: dict[int, int] = {}
        self._tick = 0
        self._plans: dict[int, tuple[ViewIndex, ...]] = {}
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

    def apply(self, before: Image | None, after: Image | None, now: int) -> list[Delta]:
        """Deltas for one committed change; [] when the change is not newer than the last seen.

        ``before`` is None for a create, ``after`` None for a delete (then the version check
        uses ``before.version + 1``).
        """
        if after is not None:
            cid, version = after.id, after.version
        elif before is not None:
            cid, version = before.id, before.version + 1
        else:
            return []
        if self.versions.get(cid, 0) >= version:
            return []
        self.versions[cid] = version
        return self.deltas(before, after, now)

    def deltas(self, before: Image | None, after: Image | None, now: int,
               views: Iterable[CompiledView] | None = None) -> list[Delta]:
        """Deltas between two images, without the version bookkeeping (also used by the
        clock, which re-evaluates one image at two instants)."""
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

        Also records each image's version, so the engine continues from this state.
        """
        views = list(self.views.values()) if view_ids is None else [self.views[i]
                                                                     for i in view_ids]
        counts: Counts = {}
        for image in images:
            if self.versions.get(image.id, 0) < image.version:
                self.versions[image.id] = image.version
            for vid, group, teammate, delta in self.deltas(None, image, now, views):
                key = (vid, group, teammate)
                value = counts.get(key, 0) + delta
                if value:
                    counts[key] = value
                else:
                    del counts[key]
        return counts


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
