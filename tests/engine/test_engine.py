"""The engine against a brute-force evaluation and against SQL, on random views and changes."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from livecount.conversations import apply_patch, new_image, validate_body
from livecount.domain import NOBODY, Image
from livecount.engine import Engine, compile_view, necessary_condition
from livecount.filters.parse import parse_filter
from livecount.filters.predicate import compile_predicate
from livecount.filters.sql import register_sqlite_functions
from livecount.store.base import Counts, View
from livecount.store.queries import recount
from livecount.store.rows import insert_image
from livecount.store.schema import metadata
from tests.strategies import NOW, TEAMMATES, conversation_bodies, filters, images, patches, views

#: Teammates whose counts are checked: the pool, plus one no conversation ever names.
VIEWERS = (*TEAMMATES, max(TEAMMATES) + 1)


def as_views(specs: Iterable[dict[str, Any]]) -> list[View]:
    return [View(id=i + 1, workspace_id=1, name=s["name"], filter=s["filter"],
                 group_by=s["group_by"], owner_id=s["owner_id"], position=i, version=1)
            for i, s in enumerate(specs)]


def seen_by(counts: Counts, view: View, teammate: int) -> dict[str | None, int]:
    """What ``teammate`` sees of ``view`` given decomposed counts (base + adjustment)."""
    out: dict[str | None, int] = {}
    for (vid, group, who), n in counts.items():
        if vid == view.id and (who is None or who == teammate):
            out[group] = out.get(group, 0) + n
    return {g: n for g, n in out.items() if n}


def brute_force(images: Iterable[Image], view: View, teammate: int) -> dict[str | None, int]:
    """Evaluate the view's filter on every conversation, as ``teammate``."""
    compiled = compile_view(view)
    predicate = compile_predicate(parse_filter(view.filter))
    me = view.owner_id if view.owner_id is not None else teammate
    out: dict[str | None, int] = {}
    for image in images:
        if predicate(image, me, NOW):
            groups: Iterable[str | None] = compiled.group(image) if compiled.group else (None,)
            for group in groups:
                out[group] = out.get(group, 0) + 1
    return out


def add(counts: Counts, deltas: Iterable[tuple[int, str | None, int | None, int]]) -> None:
    for vid, group, teammate, delta in deltas:
        key = (vid, group, teammate)
        value = counts.get(key, 0) + delta
        if value:
            counts[key] = value
        else:
            counts.pop(key, None)


@pytest.fixture(scope="module")
def sqlite_db() -> Iterator[sa.Engine]:
    """One in-memory database for the module; each example empties it first."""
    engine = sa.create_engine("sqlite://", poolclass=sa.StaticPool)
    sa.event.listen(engine, "connect", lambda conn, _: register_sqlite_functions(conn))
    metadata.create_all(engine)
    try:
        yield engine
    finally:
        engine.dispose()


def sql_counts(db: sa.Engine, images: list[Image], view_list: list[View]) -> Counts:
    with db.begin() as conn:
        for table in reversed(metadata.sorted_tables):
            conn.execute(table.delete())
        conn.execute(sa.text("INSERT INTO workspaces (id, name, created_at) "
                             "VALUES (1, 'w', 0)"))
        for image in images:
            insert_image(conn, image)
        return recount(conn, 1, view_list, NOW)


# A step: create a conversation, patch one (by index into those created), or replay an
# earlier change (a duplicated or re-delivered outbox entry).
steps = st.lists(st.one_of(
    st.tuples(st.just("create"), conversation_bodies()),
    st.tuples(st.just("patch"), st.integers(0, 20), patches()),
    st.tuples(st.just("replay"), st.integers(0, 50)),
), min_size=1, max_size=25)


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
          deadline=None)
@given(view_specs=st.lists(views(), min_size=1, max_size=5), script=steps)
def test_engine_equals_brute_force_and_sql(view_specs: list[dict[str, Any]],
                                           script: list[Any], sqlite_db: sa.Engine) -> None:
    view_list = as_views(view_specs)
    engine = Engine(view_list)
    counts: Counts = {}
    current: dict[int, Image] = {}
    log: list[tuple[Image | None, Image]] = []
    clock = NOW
    for step in script:
        if step[0] == "create":
            cid = len(current) + 1
            image = new_image(cid, 1, validate_body(step[1], patch=False),
                              step[1].get("author_id"), clock)
            change: tuple[Image | None, Image] = (None, image)
        elif step[0] == "patch" and current:
            before = current[1 + step[1] % len(current)]
            clock += 1
            change = (before, apply_patch(before, validate_body(step[2], patch=True), clock))
        else:
            continue
        log.append(change)
        current[change[1].id] = change[1]
        add(counts, engine.deltas(*change, NOW))

    images = list(current.values())
    for view in view_list:
        for teammate in VIEWERS if view.owner_id is None else (view.owner_id,):
            assert seen_by(counts, view, teammate) == brute_force(images, view, teammate), (
                view, teammate)
    assert counts == sql_counts(sqlite_db, images, view_list)
    assert counts == Engine(view_list).count(images, NOW)
    # an engine over this one's compiled views (as a reconcile builds it) counts the same,
    # with copies of its own (the scratch state of the live engine's views stays theirs)
    twin = Engine(list(engine.views.values()))
    assert all(twin.views[v] is not compiled for v, compiled in engine.views.items())
    assert twin.count(images, NOW) == counts


@pytest.mark.parametrize("depth", [1, 2, 4])
@given(data=st.data())
def test_necessary_condition_is_sound(depth: int, data: st.DataObject) -> None:
    """Whenever a filter matches (for any viewer), one of its index conjunctions holds.

    Shallow filters too, so every single operator is checked on its own, often."""
    filter_json = data.draw(filters(max_depth=depth))
    image = data.draw(images())
    tree = parse_filter(filter_json)
    predicate = compile_predicate(tree)
    condition = necessary_condition(tree)
    if condition is None or not any(predicate(image, me, NOW) for me in (NOBODY, *TEAMMATES)):
        return
    for conjunction in condition:
        if all((value in getattr(image, name)) if isinstance(getattr(image, name), frozenset)
               else getattr(image, name) == value for name, value in conjunction):
            return
    pytest.fail(f"no conjunction of {condition} holds for a matching image")


def folder(name: str, group_by: str | None = None, **condition: Any) -> dict[str, Any]:
    parts: list[dict[str, Any]] = [{"field": "state", "operator": "=", "value": "open"}]
    parts += [{"field": f, "operator": "=", "value": v} for f, v in condition.items()]
    return {"name": name, "filter": {"operator": "AND", "value": parts}, "group_by": group_by,
            "owner_id": None}


def test_inbox_scenario() -> None:
    """Garnish: the folders move as a person expects."""
    view_list = as_views([folder("Your inbox", assignee_id="$me"), folder("All"),
                          folder("Teammates", "assignee_id")])
    engine = Engine(view_list)
    counts: Counts = {}
    a = new_image(1, 1, validate_body({"assignee_id": 2}, patch=False), None, NOW)
    add(counts, engine.deltas(None, a, NOW))
    assert seen_by(counts, view_list[0], 2) == {None: 1}
    assert seen_by(counts, view_list[0], 3) == {}
    assert seen_by(counts, view_list[2], 3) == {"2": 1}
    b = apply_patch(a, validate_body({"assignee_id": 3}, patch=True), NOW)
    add(counts, engine.deltas(a, b, NOW))
    assert seen_by(counts, view_list[0], 2) == {}
    assert seen_by(counts, view_list[0], 3) == {None: 1}
    assert seen_by(counts, view_list[2], 1) == {"3": 1}
    c = apply_patch(b, validate_body({"state": "closed"}, patch=True), NOW)
    add(counts, engine.deltas(c.__class__(**{**{f: getattr(b, f) for f in b.__struct_fields__}}),
                             c, NOW))
    assert counts == {}


def test_views_change_at_run_time() -> None:
    view_list = as_views([folder("All")])
    engine = Engine(view_list)
    image = new_image(1, 1, validate_body({"tags": ["vip"]}, patch=False), None, NOW)
    engine.deltas(None, image, NOW)
    vip = View(id=9, workspace_id=1, name="VIP",
               filter={"field": "tags", "operator": "contains", "value": "vip"},
               group_by=None, owner_id=None, position=1, version=1)
    engine.set_view(vip)
    assert Engine([vip]).count([image], NOW) == {(9, None, None): 1}
    later = apply_patch(image, validate_body({"tags": []}, patch=True), NOW)
    assert sorted(engine.deltas(image, later, NOW)) == [(9, None, None, -1)]
    engine.remove_view(9)
    again = apply_patch(later, validate_body({"tags": ["vip"]}, patch=True), NOW)
    assert engine.deltas(later, again, NOW) == []  # the removed view is not evaluated
