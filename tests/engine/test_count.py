"""The engine's batched from-scratch count against the sum of its own per-image deltas."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from livecount.conversations import new_image, validate_body
from livecount.domain import NOBODY, STATES, Image
from livecount.engine import Engine
from livecount.engine import engine as engine_module
from livecount.engine.engine import _specialise
from livecount.filters.parse import parse_filter
from livecount.filters.predicate import compile_predicate
from livecount.store.base import Counts, View
from tests.strategies import (
    NOW,
    TAGS,
    TEAMMATES,
    TEAMS,
    TIMESTAMPS,
    filters,
    image_lists,
    images,
    views,
)

_CHANNELS = ("chat", "email", "Chat")
#: Comparisons the index turns into keys, and comparisons on the same fields that a key
#: decides (or not) on its bucket: what the batched count specialises.
_PINS: dict[str, st.SearchStrategy[dict[str, Any]]] = {
    "state": st.sampled_from(STATES).map(lambda v: {"operator": "=", "value": v}),
    "team_id": st.one_of(st.sampled_from(TEAMS).map(lambda v: {"operator": "=", "value": v}),
                         st.just({"operator": "is null"}),
                         st.lists(st.sampled_from(TEAMS), min_size=1, max_size=2).map(
                             lambda v: {"operator": "IN", "value": v})),
    "assignee_id": st.one_of(
        st.sampled_from((*TEAMMATES, "$me")).map(lambda v: {"operator": "=", "value": v}),
        st.just({"operator": "is null"})),
    "author_id": st.sampled_from((*TEAMMATES, "$me")).map(
        lambda v: {"operator": "=", "value": v}),
    "priority": st.booleans().map(lambda v: {"operator": "=", "value": v}),
    "channel": st.sampled_from(_CHANNELS).map(lambda v: {"operator": "=", "value": v}),
    "tags": st.sampled_from(TAGS[:3]).map(lambda v: {"operator": "contains", "value": v}),
    "mentions": st.sampled_from((*TEAMMATES[:3], "$me")).map(
        lambda v: {"operator": "contains", "value": v}),
}
_OTHERS: dict[str, st.SearchStrategy[dict[str, Any]]] = {
    "state": st.sampled_from(STATES).flatmap(lambda v: st.sampled_from((
        {"operator": "!=", "value": v}, {"operator": "NIN", "value": [v]},
        {"operator": "IN", "value": [v, "closed"]}))),
    "team_id": st.sampled_from(TEAMS).flatmap(lambda v: st.sampled_from((
        {"operator": "!=", "value": v}, {"operator": "is not null"},
        {"operator": ">=", "value": v}))),
    "assignee_id": st.sampled_from(TEAMMATES).flatmap(lambda v: st.sampled_from((
        {"operator": "!=", "value": v}, {"operator": "is not null"},
        {"operator": "IN", "value": [v, "$me"]}))),
    "tags": st.sampled_from(TAGS[:3]).flatmap(lambda v: st.sampled_from((
        {"operator": "not_contains", "value": v}, {"operator": "contains", "value": v},
        {"operator": "is not null"}))),
    "priority": st.booleans().map(lambda v: {"operator": "!=", "value": v}),
    "channel": st.sampled_from(_CHANNELS).map(lambda v: {"operator": "~", "value": v[:2]}),
}


def _comparison(table: dict[str, st.SearchStrategy[dict[str, Any]]]
                ) -> st.SearchStrategy[dict[str, Any]]:
    return st.sampled_from(sorted(table)).flatmap(
        lambda field: table[field].map(lambda rest: {"field": field, **rest}))


_conjunction = st.lists(st.one_of(_comparison(_PINS), _comparison(_PINS), _comparison(_OTHERS),
                                  filters(max_depth=2)), min_size=1, max_size=4).map(
    lambda parts: {"operator": "AND", "value": parts})


@st.composite
def pinned_views(draw: st.DrawFn) -> dict[str, Any]:
    """Views the index keys (one conjunction, or an OR of two or three), with comparisons
    on the key fields that a bucket decides, $me, groups, personal ones."""
    parts = draw(st.lists(_conjunction, min_size=1, max_size=3))
    filter_ = parts[0] if len(parts) == 1 else {"operator": "OR", "value": parts}
    text = str(filter_)
    return {"name": "pinned", "filter": filter_,
            "group_by": draw(st.sampled_from((None, None, "team_id", "tags", "assignee_id",
                                              "custom.seats"))),
            # $me may not appear under NOT: only shared views keep it unbound
            "owner_id": draw(st.sampled_from((None, 2))) if "$me" in text else None}


any_views = st.one_of(views(), pinned_views(), pinned_views())


def as_views(specs: Iterable[dict[str, Any]]) -> list[View]:
    return [View(id=i + 1, workspace_id=1, name=s["name"], filter=s["filter"],
                 group_by=s["group_by"], owner_id=s["owner_id"], position=i, version=1)
            for i, s in enumerate(specs)]


def summed_deltas(engine: Engine, images: Iterable[Image], now: int,
                  view_ids: set[int] | None = None) -> Counts:
    """What ``count`` must equal: every image created, one at a time, through ``deltas``."""
    counts: Counts = {}
    for image in images:
        for vid, group, teammate, delta in engine.deltas(None, image, now):
            if view_ids is not None and vid not in view_ids:
                continue
            key = (vid, group, teammate)
            value = counts.get(key, 0) + delta
            if value:
                counts[key] = value
            else:
                del counts[key]
    return counts


#: Images that meet the views often: random ones, plus copies sharing index keys.
image_sets = image_lists(max_size=12)


@settings(suppress_health_check=[HealthCheck.too_slow], deadline=None, max_examples=300)
@given(view_specs=st.lists(any_views, min_size=1, max_size=8), images=image_sets,
       now=st.sampled_from(TIMESTAMPS), data=st.data())
def test_count_equals_summed_deltas(view_specs: list[dict[str, Any]], images: list[Image],
                                    now: int, data: st.DataObject) -> None:
    view_list = as_views(view_specs)
    engine = Engine(view_list)
    expected = summed_deltas(engine, images, now)
    assert engine.count(images, now) == expected
    # resumable: any split into slices, accumulated into one dict, gives the same counts
    cuts = sorted(data.draw(st.lists(st.integers(0, len(images)), max_size=3)))
    counts: Counts = {}
    for start, end in zip([0, *cuts], [*cuts, len(images)], strict=True):
        assert engine.count_into(counts, images[start:end], now) is counts
    assert counts == expected
    # a subset of the views, in any order, counts exactly those views
    ids = [v.id for v in view_list]
    subset = data.draw(st.lists(st.sampled_from(ids), unique=True))
    assert engine.count(images, now, subset) == summed_deltas(engine, images, now, set(subset))
    chunked: Counts = {}
    for image in images:
        engine.count_into(chunked, [image], now, subset)
    assert chunked == summed_deltas(engine, images, now, set(subset))
    # a fresh engine of just those views counts the same (its own index, same answers)
    only = [v for v in view_list if v.id in set(subset)]
    assert Engine(only).count(images, now) == summed_deltas(engine, images, now, set(subset))


@settings(suppress_health_check=[HealthCheck.too_slow], deadline=None, max_examples=100)
@given(view_specs=st.lists(any_views, min_size=1, max_size=6), images=image_sets,
       copies=st.integers(2, 30))
def test_count_on_crowded_buckets(view_specs: list[dict[str, Any]], images: list[Image],
                                  copies: int) -> None:
    """Many images with equal key fields (big buckets, shared value tallies, overlapping
    buckets of OR views): still the summed deltas."""
    crowd = [new_image(1000 * k + i, 1, validate_body(
        {"state": image.state, "team_id": image.team_id, "assignee_id": image.assignee_id,
         "tags": sorted(image.tags), "mentions": sorted(image.mentions),
         "priority": image.priority, "channel": image.channel,
         "custom": image.custom}, patch=False), image.author_id, image.created_at)
        for k in range(copies) for i, image in enumerate(images[:3])]
    everything = [*images, *crowd]
    # views that share buckets and read one more field, so values are tallied once
    extra = [{"name": f"seats {n}", "group_by": None, "owner_id": None,
              "filter": {"operator": "AND", "value": [
                  {"field": "state", "operator": "=", "value": "open"},
                  {"field": "custom.seats", "operator": ">=", "value": n}]}}
             for n in (1, 5, 10)]
    engine = Engine(as_views([*view_specs, *extra]))
    expected = summed_deltas(engine, everything, NOW)
    saved = engine_module._BY_VALUE_AT
    engine_module._BY_VALUE_AT = 2  # type: ignore[misc]  # tally values on small buckets too
    try:
        assert engine.count(everything, NOW) == expected
        counts: Counts = {}
        for start in range(0, len(everything), 7):  # values remembered across slices
            engine.count_into(counts, everything[start:start + 7], NOW)
        assert counts == expected
    finally:
        engine_module._BY_VALUE_AT = saved  # type: ignore[misc]


def test_count_of_unknown_view_raises() -> None:
    engine = Engine(as_views([{"name": "All", "group_by": None, "owner_id": None,
                               "filter": {"field": "state", "operator": "=", "value": "open"}}]))
    try:
        engine.count([], NOW, [1, 2])
    except KeyError:
        pass
    else:
        raise AssertionError("an unknown view id must raise KeyError")


def test_count_folders_and_me() -> None:
    """The seeded folders on a known set: base counts and per-teammate adjustments."""
    folders = [
        ("Your inbox", {"operator": "AND", "value": [
            {"field": "state", "operator": "=", "value": "open"},
            {"field": "assignee_id", "operator": "=", "value": "$me"}]}, None),
        ("Mentions", {"operator": "AND", "value": [
            {"field": "state", "operator": "=", "value": "open"},
            {"field": "mentions", "operator": "contains", "value": "$me"}]}, None),
        ("Unassigned", {"operator": "AND", "value": [
            {"field": "state", "operator": "=", "value": "open"},
            {"field": "assignee_id", "operator": "is null"}]}, None),
        ("All", {"field": "state", "operator": "=", "value": "open"}, None),
        ("Teams", {"field": "state", "operator": "=", "value": "open"}, "team_id"),
        ("Tags", {"field": "state", "operator": "=", "value": "open"}, "tags"),
    ]
    view_list = as_views({"name": n, "filter": f, "group_by": g, "owner_id": None}
                         for n, f, g in folders)
    bodies = [
        {"assignee_id": 1, "team_id": 1, "tags": ["a", "b"], "mentions": [2, 3]},
        {"assignee_id": 1, "team_id": 2, "tags": ["a"]},
        {"team_id": 1, "mentions": [2]},
        {"state": "closed", "assignee_id": 2, "team_id": 1, "mentions": [1]},
    ]
    images = [new_image(i + 1, 1, validate_body(b, patch=False), 3, NOW)
              for i, b in enumerate(bodies)]
    counts = Engine(view_list).count(images, NOW)
    assert counts == {
        (1, None, 1): 2,  # Your inbox: nobody's base, teammate 1 has two
        (2, None, 2): 2, (2, None, 3): 1,  # Mentions
        (3, None, None): 1,  # Unassigned
        (4, None, None): 3,  # All
        (5, "1", None): 2, (5, "2", None): 1,  # Teams
        (6, "a", None): 2, (6, "b", None): 1,  # Tags
    }
    assert counts == summed_deltas(Engine(view_list), images, NOW)


_KEY_FIELDS = ("state", "team_id", "assignee_id", "author_id", "priority", "channel", "tags",
               "mentions", "unread_by")


@settings(suppress_health_check=[HealthCheck.too_slow], deadline=None, max_examples=500)
@given(filter_=st.one_of(filters(), *[pinned_views().map(lambda v: v["filter"])] * 3),
       image=images(),
       fields=st.one_of(st.just(set(_KEY_FIELDS)),
                        st.sets(st.sampled_from(_KEY_FIELDS), min_size=1)),
       data=st.data())
def test_specialised_filter_agrees_on_its_bucket(filter_: dict[str, Any], image: Image,
                                                 fields: set[str],
                                                 data: st.DataObject) -> None:
    """What the batched count evaluates on a bucket (the filter with the facts of the
    bucket's key substituted) answers as the whole filter on every image of that bucket."""
    known: dict[str, Any] = {}
    for name in fields:
        value = getattr(image, name)
        if isinstance(value, frozenset):
            if not value:
                continue  # an image with no element is in no bucket of this field
            value = data.draw(st.sampled_from(sorted(value, key=repr)))
        known[name] = value
    tree = parse_filter(filter_)
    residual = _specialise(tree, known)
    whole = compile_predicate(tree)
    part = residual if isinstance(residual, bool) else compile_predicate(residual)
    for me in (NOBODY, *TEAMMATES):
        expected = whole(image, me, NOW)
        assert (part if isinstance(part, bool) else part(image, me, NOW)) == expected, (
            residual, known, me)
