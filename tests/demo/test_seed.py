"""The demo's seed data: the numbers asked for, valid showcase views, realistic spreads, and
counts the relay keeps equal to a SQL recount whether it starts before or after seeding."""

from __future__ import annotations

import random
import time
from collections import Counter
from collections.abc import AsyncIterator

import pytest
from hypothesis import given
from hypothesis import strategies as st

from livecount.bus import MemoryBus
from livecount.conversations import validate_body
from livecount.demo.seed import (
    CHANNELS,
    PEOPLE,
    PLANS,
    TAGS,
    TEAM_NAMES,
    DemoWorkspace,
    conversation_body,
    custom_views,
    personal_view,
    seed_workspace,
)
from livecount.domain import now_us
from livecount.filters.parse import parse_filter
from livecount.relay import Relay
from livecount.state import MemoryState
from livecount.store import open_store
from livecount.store.base import Counts, Store, Team
from livecount.store.seed import FOLDERS

pytestmark = pytest.mark.anyio

FAKE_TEAMS = [Team(10 + i, 1, name, [4 * i + j for j in range(1, 5)])
              for i, name in enumerate(TEAM_NAMES)]


@pytest.fixture
async def store(sqlite_url: str) -> AsyncIterator[Store]:
    opened = open_store(sqlite_url)
    await opened.open()
    try:
        yield opened
    finally:
        await opened.close()


async def exact(relay: Relay, store: Store, demo: DemoWorkspace, now: int) -> None:
    """After the relay syncs, every counter equals the SQL recount at the same position."""
    await relay.sync()
    views = relay.views(demo.id)
    assert len(views) == len(FOLDERS) + 8
    recount = await store.recount(demo.id, views, now)
    assert recount.position == relay.position
    assert nonzero((await relay.state.snapshot(demo.id)).counts) == nonzero(recount.counts)


def nonzero(counts: Counts) -> Counts:
    """A counter that is absent counts 0: compare what is not."""
    return {key: n for key, n in counts.items() if n}


def test_every_custom_view_filter_is_valid() -> None:
    specs = [*custom_views(FAKE_TEAMS), personal_view(3)]
    assert len(specs) == 7
    assert len({spec.name for spec in specs}) == 7
    for spec in specs:
        parse_filter(spec.filter)  # raises on anything invalid
    assert [spec.owner_id for spec in specs] == [None] * 6 + [3]
    grouped = {spec.name: spec.group_by for spec in specs if spec.group_by}
    assert grouped == {"Enterprise plans": "team_id", "Bugs by assignee": "assignee_id"}


@given(seed=st.integers(0, 2**32), fresh=st.booleans())
def test_every_body_is_a_valid_create(seed: int, fresh: bool) -> None:
    rng = random.Random(seed)
    now = now_us()
    for _ in range(20):
        body = conversation_body(rng, FAKE_TEAMS, now, fresh=fresh)
        fields = validate_body(body, patch=False)
        team = next((t for t in FAKE_TEAMS if t.id == fields.get("team_id")), None)
        if team is not None and fields.get("assignee_id") is not None:
            assert fields["assignee_id"] in team.member_ids  # assigned within the team
        if fields["state"] == "open":
            assert fields["waiting_since"] <= now
        if fields["state"] == "snoozed":
            assert fields["snoozed_until"] > now
        if fresh:
            assert fields["state"] == "open" and fields["waiting_since"] == now


async def test_seeding_makes_exactly_what_was_asked(store: Store) -> None:
    started = time.perf_counter()
    demo = await seed_workspace(store, seed=7)  # the demo's default: 2,000 conversations
    seconds = time.perf_counter() - started
    assert seconds < 30, f"seeding 2,000 conversations took {seconds:.1f}s"

    teams = await store.list_teams(demo.id)
    assert [t.name for t in teams] == list(TEAM_NAMES)
    assert all(len(t.member_ids) == 4 for t in teams)
    people = await store.list_teammates(demo.id)
    assert len(people) == 12 == len({p.email for p in people})
    assert {p.name for p in people} == {name for name, _ in PEOPLE}
    assert sorted(m for t in teams for m in t.member_ids) == sorted(p.id for p in people)
    assert [login.teammate.id for login in demo.logins] == [m for t in teams for m in t.member_ids]
    for login in demo.logins:  # the tokens printed by the demo log in as their teammate
        assert await store.authenticate(login.token) == login.teammate
        assert login.teammate.id in login.team.member_ids

    views = await store.list_views(demo.id)
    assert [v.name for v in views[:7]] == [f.name for f in FOLDERS]
    custom = views[7:]
    assert [v.name for v in custom] == [s.name for s in custom_views(teams)] + ["My priority"] * 2
    assert [v.owner_id for v in custom] == [None] * 6 + [demo.logins[0].teammate.id,
                                                          demo.logins[4].teammate.id]
    assert tuple(custom) == demo.views

    snapshot = await store.snapshot(demo.id)
    images = snapshot.conversations
    assert len(images) == 2000 == len(set(demo.conversation_ids))
    assert {c.id for c in images} == set(demo.conversation_ids)

    # Realistic spreads (2,000 draws: wide bounds that still catch a broken distribution).
    states = Counter(c.state for c in images)
    assert 1200 < states["open"] < 1600 and 100 < states["snoozed"] < 320
    assert 250 < states["closed"] < 550
    assert 1050 < sum(c.assignee_id is not None for c in images) < 1350
    assert 1550 < sum(c.team_id is not None for c in images) < 1850
    assert 200 < sum(c.priority for c in images) < 400
    assert set(Counter(c.channel for c in images)) == set(CHANNELS)
    assert set().union(*(c.tags for c in images)) == set(TAGS)
    assert 100 < sum(bool(c.mentions) for c in images) < 400
    assert 300 < sum(bool(c.unread_by) for c in images) < 700
    assert {c.custom["plan"] for c in images} == set(PLANS)
    assert all(isinstance(c.custom["seats"], int) and c.custom["seats"] >= 1 for c in images)
    assert all(c.waiting_since is not None for c in images if c.state == "open")
    assert all(c.snoozed_until is not None for c in images if c.state == "snoozed")
    assert all(c.waiting_since is None and c.snoozed_until is None
               for c in images if c.state == "closed")
    assert 300 < sum(c.author_id is not None for c in images) < 700


@pytest.mark.parametrize("relay_first", [False, True], ids=["rebuilt", "followed"])
async def test_counts_equal_sql_recount(store: Store, relay_first: bool) -> None:
    """The relay counts everything: rebuilt from a snapshot after seeding, or following the
    outbox while seeding runs."""
    now = now_us()
    bus = MemoryBus()
    relay = Relay(store, MemoryState(), bus, clock=lambda: now)
    try:
        if relay_first:
            await relay.start()
        demo = await seed_workspace(store, conversations=1000 if not relay_first else 600)
        if not relay_first:
            await relay.start()
        await exact(relay, store, demo, now)
        counts = (await relay.state.snapshot(demo.id)).counts
        for view in demo.views:  # every showcase view shows something
            assert any(n > 0 for (vid, _, _), n in counts.items() if vid == view.id), view.name
    finally:
        await relay.stop()
        await bus.close()
