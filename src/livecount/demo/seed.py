"""A realistic demo workspace, written through the Store API so the outbox records all of it.

Three teams of four, a few thousand conversations whose states, assignments, tags, channels and
custom attributes are distributed the way a real support inbox looks, and custom views that
show off the filter language. Everything is drawn from one seeded :class:`random.Random`, so
a given ``seed`` gives the same bodies every time.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final, NamedTuple

from ..domain import format_timestamp, now_us
from ..store.base import Store, Team, Teammate, View, Workspace

__all__ = [
    "CHANNELS",
    "PEOPLE",
    "PLANS",
    "TAGS",
    "TEAM_NAMES",
    "DemoWorkspace",
    "Login",
    "ViewSpec",
    "conversation_body",
    "custom_views",
    "personal_view",
    "seed_workspace",
]

_SECOND: Final = 1_000_000
_MINUTE: Final = 60 * _SECOND
_HOUR: Final = 60 * _MINUTE

TEAM_NAMES: Final = ("Billing", "Technical support", "Sales")
#: Twelve teammates, four per team, in team order.
PEOPLE: Final = (
    ("Amelia Hart", "amelia.hart"), ("Noah Fischer", "noah.fischer"),
    ("Priya Raman", "priya.raman"), ("Lucas Moreau", "lucas.moreau"),
    ("Sofia Alvarez", "sofia.alvarez"), ("Kenji Watanabe", "kenji.watanabe"),
    ("Grace Okafor", "grace.okafor"), ("Mateo Rossi", "mateo.rossi"),
    ("Hannah Becker", "hannah.becker"), ("Omar Haddad", "omar.haddad"),
    ("Chloe Dubois", "chloe.dubois"), ("Ethan Novak", "ethan.novak"),
)
EMAIL_DOMAIN: Final = "acme.example"
TEAM_SIZE: Final = 4

#: Tag → probability a conversation of (Billing, Technical support, Sales, no team) has it.
TAGS: Final[dict[str, tuple[float, float, float, float]]] = {
    "vip": (0.10, 0.10, 0.15, 0.05),
    "billing": (0.55, 0.05, 0.10, 0.10),
    "refund": (0.20, 0.02, 0.03, 0.05),
    "bug": (0.03, 0.45, 0.02, 0.10),
    "integration": (0.02, 0.15, 0.05, 0.03),
    "onboarding": (0.03, 0.10, 0.30, 0.08),
    "churn-risk": (0.06, 0.05, 0.10, 0.03),
    "feature-request": (0.02, 0.12, 0.08, 0.05),
    "urgent": (0.04, 0.06, 0.02, 0.03),
}
CHANNELS: Final = {"chat": 45, "email": 35, "phone": 10, "social": 10}
#: plan → (weight, smallest seat count, largest seat count)
PLANS: Final = {"free": (55, 1, 5), "pro": (35, 5, 80), "enterprise": (10, 40, 2500)}


class ViewSpec(NamedTuple):
    """A view to create: what :meth:`Store.create_view` takes, minus the workspace."""

    name: str
    filter: dict[str, Any]
    group_by: str | None = None
    owner_id: int | None = None


@dataclass(frozen=True)
class Login:
    """A teammate with the bearer token the seeding received for them (shown once)."""

    teammate: Teammate
    team: Team
    token: str


@dataclass(frozen=True)
class DemoWorkspace:
    """What seeding made: ids and tokens, never conversation images."""

    workspace: Workspace
    teams: tuple[Team, ...]
    logins: tuple[Login, ...]
    views: tuple[View, ...]  # the custom and personal views (folders come with the workspace)
    conversation_ids: tuple[int, ...]

    @property
    def id(self) -> int:
        return self.workspace.id

    @property
    def teammate_ids(self) -> list[int]:
        return [login.teammate.id for login in self.logins]


def _cond(field: str, operator: str, value: Any = None) -> dict[str, Any]:
    node: dict[str, Any] = {"field": field, "operator": operator}
    if operator not in ("is null", "is not null"):
        node["value"] = value
    return node


def _and(*nodes: dict[str, Any]) -> dict[str, Any]:
    return {"operator": "AND", "value": list(nodes)}


_OPEN: Final = _cond("state", "=", "open")


def custom_views(teams: Sequence[Team]) -> list[ViewSpec]:
    """The shared views a team would save; ``teams`` in :data:`TEAM_NAMES` order."""
    billing = teams[0].id
    return [
        ViewSpec("VIP waiting", _and(_OPEN, _cond("tags", "contains", "vip"),
                                     _cond("waiting_since", "older_than", 3600))),
        ViewSpec("Billing, priority", _and(
            _OPEN, _cond("priority", "=", True),
            {"operator": "OR", "value": [_cond("team_id", "=", billing),
                                         _cond("tags", "contains", "billing")]})),
        ViewSpec("Enterprise plans", _and(_OPEN, _cond("custom.plan", "=", "enterprise")),
                 "team_id"),
        ViewSpec("Unassigned email", _and(_OPEN, _cond("assignee_id", "is null"),
                                          _cond("channel", "=", "email"))),
        ViewSpec("Bugs by assignee", _and(_cond("state", "IN", ["open", "snoozed"]),
                                          _cond("tags", "contains", "bug")), "assignee_id"),
        ViewSpec("Large accounts", _and(_OPEN, _cond("custom.seats", ">=", 50))),
    ]


def personal_view(owner_id: int) -> ViewSpec:
    """A ``$me`` view only its owner sees."""
    return ViewSpec("My priority", _and(_OPEN, _cond("assignee_id", "=", "$me"),
                                        _cond("priority", "=", True)), owner_id=owner_id)


def _weighted(rng: random.Random, weights: dict[str, Any], index: int | None = None) -> str:
    names = list(weights)
    values = [w if index is None else w[index] for w in weights.values()]
    return rng.choices(names, values)[0]


def conversation_body(rng: random.Random, teams: Sequence[Team], now: int, *,
                      fresh: bool = False) -> dict[str, Any]:
    """One conversation's create body (wire form: ISO timestamps, lists for sets).

    ``fresh`` draws a conversation that just arrived: open, waiting since now, usually not yet
    assigned. Otherwise it draws one from a lived-in inbox: mostly open, some snoozed or
    closed, about 60% assigned, most with a team.
    """
    team = rng.choice(teams) if rng.random() < 0.85 else None
    slot = len(TEAM_NAMES) if team is None else teams.index(team) % len(TEAM_NAMES)
    state = "open" if fresh else rng.choices(("open", "snoozed", "closed"), (70, 10, 20))[0]
    body: dict[str, Any] = {"state": state, "channel": _weighted(rng, CHANNELS)}
    members = team.member_ids if team is not None else [m for t in teams for m in t.member_ids]
    if rng.random() < (0.15 if fresh else 0.6):
        body["assignee_id"] = rng.choice(members)
    if team is not None:
        body["team_id"] = team.id
    if rng.random() < 0.15:
        body["priority"] = True
    tags = [tag for tag, chances in TAGS.items() if rng.random() < chances[slot]]
    if tags:
        body["tags"] = tags
    if rng.random() < 0.12:
        body["mentions"] = rng.sample(members, rng.randint(1, 2))
    if rng.random() < 0.25:
        body["unread_by"] = rng.sample(members, rng.randint(1, 3))
    if state == "open":
        waited = 0 if fresh else int(rng.expovariate(1 / (6 * _HOUR)))
        body["waiting_since"] = format_timestamp(now - waited)
    elif state == "snoozed":
        body["snoozed_until"] = format_timestamp(now + rng.randint(5, 24 * 60) * _MINUTE)
    plan = _weighted(rng, {name: spec[0] for name, spec in PLANS.items()})
    _, low, high = PLANS[plan]
    body["custom"] = {"plan": plan, "seats": rng.randint(low, high)}
    return body


async def seed_workspace(store: Store, *, conversations: int = 2000, seed: int = 1,
                         name: str = "Acme Inc.", concurrency: int = 8) -> DemoWorkspace:
    """Create the demo workspace in an opened ``store`` and return its ids and tokens.

    Conversation creates run ``concurrency`` at a time. The store serialises writes on its
    writer thread (about 1.4 ms per create on SQLite, so 2,000 take about 3 s); a few queued
    keep that thread busy while the event loop hands it the next one. Measured: one at a
    time is barely slower, so the bound is about memory and fairness, not speed.
    """
    if conversations < 0:
        raise ValueError("conversations must not be negative")
    rng = random.Random(seed)
    workspace = await store.create_workspace(name)
    people: list[tuple[Teammate, str]] = []
    for full_name, local in PEOPLE:
        people.append(await store.create_teammate(workspace.id, full_name,
                                                  f"{local}@{EMAIL_DOMAIN}"))
    teams: list[Team] = []
    logins: list[Login] = []
    for i, team_name in enumerate(TEAM_NAMES):
        members = people[i * TEAM_SIZE:(i + 1) * TEAM_SIZE]
        team = await store.create_team(workspace.id, team_name, [t.id for t, _ in members])
        teams.append(team)
        logins += [Login(teammate, team, token) for teammate, token in members]

    specs = [*custom_views(teams), personal_view(logins[0].teammate.id),
             personal_view(logins[TEAM_SIZE].teammate.id)]
    views = [await store.create_view(workspace.id, spec.name, spec.filter, spec.group_by,
                                     spec.owner_id) for spec in specs]

    now = now_us()
    teammate_ids = [login.teammate.id for login in logins]
    bodies = [conversation_body(rng, teams, now) for _ in range(conversations)]
    authors = [rng.choice(teammate_ids) if rng.random() < 0.25 else None for _ in bodies]
    ids = await _create_all(store, workspace.id, bodies, authors, concurrency)
    return DemoWorkspace(workspace, tuple(teams), tuple(logins), tuple(views), tuple(ids))


async def _create_all(store: Store, workspace_id: int, bodies: list[dict[str, Any]],
                      authors: list[int | None], concurrency: int) -> list[int]:
    """Create every body, at most ``concurrency`` in flight; ids in body order."""
    ids = [0] * len(bodies)
    limit = asyncio.Semaphore(max(1, concurrency))

    async def create(i: int) -> None:
        try:
            ids[i] = (await store.create_conversation(workspace_id, bodies[i], authors[i])).id
        finally:
            limit.release()

    async with asyncio.TaskGroup() as group:
        for i in range(len(bodies)):
            await limit.acquire()  # taken here, so at most `concurrency` tasks ever exist
            group.create_task(create(i))
    return ids
