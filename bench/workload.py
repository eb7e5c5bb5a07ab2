"""The DESIGN §7 engine workload: one workspace, its views and a stream of realistic changes.

Deterministic for a given seed, so every engine in a run sees exactly the same changes.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

from livecount.conversations import apply_patch, new_image, validate_body
from livecount.domain import Image
from livecount.store.base import View
from livecount.store.seed import FOLDERS

__all__ = ["Workload", "make_workload"]

STATES = ("open", "snoozed", "closed")
CHANNELS = ("chat", "email", "phone", "sms", "social")


@dataclass
class Workload:
    views: list[View]
    conversations: list[Image]
    changes: list[tuple[Image | None, Image]]
    teammates: int
    teams: int


def _views(rng: random.Random, teammates: int, teams: int, tags: list[str],
           total: int = 1000, personal: int = 50) -> list[View]:
    views = [View(id=i + 1, workspace_id=1, name=f.name, filter=f.filter,
                  group_by=f.group_by, owner_id=None, position=i, version=1)
             for i, f in enumerate(FOLDERS)]
    shared = total - len(views) - personal

    def eq(field: str, value: Any, op: str = "=") -> dict[str, Any]:
        return {"field": field, "operator": op, "value": value}

    for i in range(shared):
        state = eq("state", rng.choice(STATES))
        roll = rng.random()
        if roll < 0.4:
            parts = [state, eq("team_id", rng.randint(1, teams)),
                     eq("channel", rng.choice(CHANNELS), "!=")]
        elif roll < 0.7:
            parts = [state, eq("tags", rng.choice(tags), "contains"),
                     eq("priority", rng.random() < 0.5)]
        elif roll < 0.9:
            parts = [state, {"operator": "OR", "value": [
                eq("team_id", rng.randint(1, teams)), eq("tags", rng.choice(tags), "contains")]}]
        else:
            parts = [state, eq("channel", rng.choice(CHANNELS)),
                     eq("custom.seats", rng.randint(1, 100), ">=")]
        views.append(View(id=len(views) + 1, workspace_id=1, name=f"custom {i}",
                          filter={"operator": "AND", "value": parts}, group_by=None,
                          owner_id=None, position=len(views), version=1))
    for i in range(personal):
        mine = rng.choice([eq("assignee_id", "$me"), eq("mentions", "$me", "contains")])
        parts = [eq("state", "open"), mine]
        if rng.random() < 0.5:
            parts.append(eq("priority", True))
        views.append(View(id=len(views) + 1, workspace_id=1, name=f"personal {i}",
                          filter={"operator": "AND", "value": parts}, group_by=None,
                          owner_id=rng.randint(1, teammates), position=len(views), version=1))
    return views


def make_workload(seed: int = 7, conversations: int = 20_000, changes: int = 200_000,
                  teammates: int = 2_000, teams: int = 200, tag_count: int = 100,
                  views: int = 1000) -> Workload:
    rng = random.Random(seed)
    tags = [f"tag{i}" for i in range(tag_count)]

    def body() -> dict[str, Any]:
        return {
            "state": rng.choices(STATES, (6, 1, 3))[0],
            "assignee_id": rng.randint(1, teammates) if rng.random() < 0.7 else None,
            "team_id": rng.randint(1, teams) if rng.random() < 0.9 else None,
            "priority": rng.random() < 0.2,
            "channel": rng.choice(CHANNELS),
            "tags": rng.sample(tags, rng.choice((0, 1, 1, 2, 3))),
            "mentions": rng.sample(range(1, teammates + 1), rng.choice((0, 0, 1, 2))),
            "custom": {"seats": rng.randint(1, 120)},
        }

    now = 1_700_000_000_000_000
    current: dict[int, Image] = {}
    for cid in range(1, conversations + 1):
        current[cid] = new_image(cid, 1, validate_body(body(), patch=False),
                                 rng.randint(1, teammates), now)
    initial = list(current.values())
    stream: list[tuple[Image | None, Image]] = []
    next_id = conversations + 1
    ids = list(current)
    for _ in range(changes):
        roll = rng.random()
        if roll >= 0.9:
            image = new_image(next_id, 1, validate_body(body(), patch=False),
                              rng.randint(1, teammates), now)
            current[next_id] = image
            ids.append(next_id)
            next_id += 1
            stream.append((None, image))
            continue
        cid = rng.choice(ids)
        before = current[cid]
        if roll < 0.3:
            patch: dict[str, Any] = {"state": rng.choice([s for s in STATES
                                                          if s != before.state])}
        elif roll < 0.55:
            patch = {"assignee_id": rng.choice([None, *rng.sample(range(1, teammates + 1), 3)])}
        elif roll < 0.7:
            patch = {"tags": rng.sample(tags, rng.choice((0, 1, 2, 3)))}
        elif roll < 0.8:
            patch = {"team_id": rng.randint(1, teams)}
        else:
            patch = {"priority": not before.priority}
        after = apply_patch(before, validate_body(patch, patch=True), now)
        current[cid] = after
        stream.append((before, after))
    return Workload(_views(rng, teammates, teams, tags, views), initial, stream, teammates,
                    teams)
