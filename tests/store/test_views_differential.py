"""The store's listing and recount agree with the predicate exactly, end to end: random
conversations and random views written through the store (so through its SQL, its side
tables and its types), then ``recount`` and every page of ``list_conversations`` compared
with brute-force evaluation of the filter over the conversations the store returned — for
every teammate, every group. On each backend; on PostgreSQL this is the check that its SQL
(collation, NULLs, case folding, numbers) matches the predicate through the real store.

tests/filters checks the SQL compilation against the predicate on the same two databases;
this checks the store's own queries around it.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from livecount.domain import NOBODY, Image, image_groups, now_us
from livecount.filters.parse import parse_filter
from livecount.filters.predicate import compile_predicate
from livecount.filters.tree import bind_me
from livecount.store import open_store
from livecount.store.base import Counts, View
from livecount.store.sqlstore import SQLStore
from tests.strategies import NOW, TEAMMATES, TEAMS, conversation_bodies, patches, views

from .conftest import APPLICATION_NAME, reset_postgres

pytestmark = pytest.mark.anyio

#: The fields that name teammates or teams (of the home workspace, in the strategies).
NAMING = frozenset({"assignee_id", "team_id", "author_id", "mentions", "unread_by"})
#: Somebody no conversation names (a teammate of the other workspace, as far as ids go).
STRANGER = 99


@pytest.fixture
def fresh_url(backend: str, tmp_path: Path, request: pytest.FixtureRequest
              ) -> Callable[[], str]:
    """A function that gives an empty database each time it is called: a new SQLite file, or
    this session's PostgreSQL database emptied (ids start at 1 again)."""
    counter = itertools.count()
    if backend == "sqlite":
        return lambda: f"sqlite:///{tmp_path / f'{next(counter)}.db'}"
    url = request.getfixturevalue("pg_database")

    def fresh() -> str:
        reset_postgres(url)
        return f"{url}?application_name={APPLICATION_NAME}"
    return fresh


def seen_by(counts: Counts, view_id: int, teammate: int) -> dict[str | None, int]:
    """What ``teammate`` sees of a view: base plus their adjustment, per group (zeros out)."""
    seen: dict[str | None, int] = {}
    for (view, group, whose), n in counts.items():
        if view == view_id and whose in (None, teammate):
            seen[group] = seen.get(group, 0) + n
    return {group: n for group, n in seen.items() if n}


async def list_all(store: SQLStore, view: View, me: int, group: str | None, limit: int,
                   now: int) -> list[int]:
    ids: list[int] = []
    cursor: str | None = None
    for _ in range(200):
        page = await store.list_conversations(view, me, group, limit, cursor, now)
        assert len(page.conversations) <= limit
        ids += [c.id for c in page.conversations]
        cursor = page.next_cursor
        if cursor is None:
            return ids
        assert page.conversations  # no empty page before the last
    raise AssertionError("more pages than conversations")


@settings(max_examples=30, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(writes=st.lists(st.tuples(conversation_bodies(), st.none() | patches()), max_size=10),
       specs=st.lists(views(), min_size=1, max_size=4),
       at_fixed_now=st.booleans(), limit=st.integers(1, 4))
async def test_recount_and_listing_agree_with_the_predicate(
        fresh_url: Callable[[], str], writes: list[tuple[dict[str, Any], Any]],
        specs: list[dict[str, Any]], at_fixed_now: bool, limit: int) -> None:
    store = open_store(fresh_url())
    assert isinstance(store, SQLStore)
    await store.open()
    try:
        home = await store.create_workspace("home")
        mates = [(await store.create_teammate(home.id, f"t{i}", f"t{i}@home"))[0].id
                 for i in TEAMMATES]
        teams = [(await store.create_team(home.id, f"team{i}", [])).id for i in TEAMS]
        # the strategies name teammates 1-6 and teams 1-3: these are they
        assert (mates, teams) == (list(TEAMMATES), list(TEAMS))
        away = await store.create_workspace("away")  # its rows must never be counted
        await store.create_conversation(away.id, {}, None)
        images: dict[int, Image] = {}
        for body, patch in writes:
            image = await store.create_conversation(home.id, body, None)
            if patch is not None:
                image = await store.update_conversation(home.id, image.id, patch, None)
            images[image.id] = image
            await store.create_conversation(away.id, {k: v for k, v in body.items()
                                                      if k not in NAMING}, None)
        made = [await store.create_view(home.id, **spec) for spec in specs]
        now = NOW if at_fixed_now else now_us()
        snapshot = await store.snapshot(home.id)
        assert snapshot.conversations == sorted(images.values(), key=lambda c: c.id)
        recount = await store.recount(home.id, made, now)
        assert recount.position == snapshot.position == await store.outbox_position()
        for view in made:
            node = parse_filter(view.filter)
            if view.owner_id is not None:
                node = bind_me(node, view.owner_id)
            predicate = compile_predicate(node)
            viewers = ((view.owner_id,) if view.owner_id is not None
                       else (NOBODY, *mates, STRANGER))
            for me in viewers:
                matching = sorted((c.id for c in snapshot.conversations
                                   if predicate(c, me, now)), reverse=True)
                direct: dict[str | None, int] = {}
                for cid in matching:
                    groups = (image_groups(images[cid], view.group_by) if view.group_by
                              else (None,))
                    for group in groups:
                        direct[group] = direct.get(group, 0) + 1
                assert seen_by(recount.counts, view.id, me) == direct, (view, me)
                assert await list_all(store, view, me, None, limit, now) == matching
                for group, count in direct.items():
                    if group is not None:
                        assert len(await list_all(store, view, me, group, 50, now)) == count
    finally:
        await store.close()
