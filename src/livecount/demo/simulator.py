"""A simulated support team: a steady stream of realistic changes through the Store API.

Every change is a read, then a merge patch written with ``if_match`` (retried on
:class:`~livecount.exceptions.PreconditionFailed`), so it goes through the outbox exactly like
a write from the HTTP API and anyone editing in a browser at the same time wins or retries
cleanly. The simulator keeps only conversation ids in memory, has one write in flight at a
time and runs as one task it owns.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections import Counter
from collections.abc import Callable
from typing import Any, Final

from ..domain import Image, format_timestamp, now_us
from ..exceptions import LivecountError, NotFound, PreconditionFailed
from ..store.base import Store
from .seed import TAGS, TEAM_NAMES, DemoWorkspace, conversation_body

__all__ = ["ACTIONS", "WEIGHTS", "Simulator"]

log = logging.getLogger(__name__)

ACTIONS: Final = ("assign", "close", "snooze", "reopen", "tag", "untag", "mention", "unread",
                  "create")
#: Chosen so the open pile stays about level: create + reopen (18) = close + snooze (18).
WEIGHTS: Final = (18, 12, 6, 8, 12, 8, 12, 14, 10)
_MINUTE: Final = 60_000_000
#: A conversation that does not suit the drawn action is swapped for another this many times.
_TRIES: Final = 6
#: Re-reads after a version mismatch before giving up on a conversation.
_RETRIES: Final = 3
#: Behind schedule by more than this (seconds), the simulator skips ahead instead of bursting.
_MAX_BEHIND: Final = 1.0
#: Seconds ``stop()`` waits for the change in flight before cancelling it.
_STOP_TIMEOUT: Final = 10.0


class Simulator:
    """Changes a demo workspace at ``rate`` changes per second until stopped.

    ``changes`` counts writes that committed; ``by_action`` splits them by :data:`ACTIONS`.
    """

    def __init__(self, store: Store, demo: DemoWorkspace, *, rate: float = 5.0, seed: int = 1,
                 clock: Callable[[], int] = now_us) -> None:
        if not rate > 0:
            raise ValueError("rate must be positive")
        self.store = store
        self.workspace_id = demo.id
        self.rate = rate
        self.clock = clock
        self.changes = 0
        self.conflicts = 0
        self.errors = 0
        self.by_action: Counter[str] = Counter()
        self._rng = random.Random(seed)
        self._teams = demo.teams
        self._members = {team.id: tuple(team.member_ids) for team in demo.teams}
        self._everyone = tuple(demo.teammate_ids)
        self._ids = list(demo.conversation_ids)
        self._task: asyncio.Task[None] | None = None
        self._stopping = asyncio.Event()

    # -- life cycle -------------------------------------------------------------------------

    def start(self) -> None:
        if self._task is not None:
            raise RuntimeError("simulator already started")
        self._stopping = asyncio.Event()
        self._task = asyncio.create_task(self.run(), name="livecount-demo-simulator")

    async def stop(self) -> None:
        """End the task between two changes and wait for it.

        Not a plain ``cancel()``: a write cancelled while the store's thread runs it still
        commits, after ``stop()`` returned. The task is cancelled only if it does not end in
        time, or if ``stop()`` itself is cancelled.
        """
        task, self._task = self._task, None
        if task is None:
            return
        self._stopping.set()
        try:
            await asyncio.wait({task}, timeout=_STOP_TIMEOUT)
        finally:
            if not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if not task.cancelled():
            task.exception()  # the caller inspects it via ``task``; never "never retrieved"

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    @property
    def task(self) -> asyncio.Task[None] | None:
        return self._task

    async def run(self) -> None:
        """One change every ``1 / rate`` seconds on a fixed schedule, until stopped."""
        loop = asyncio.get_running_loop()
        interval = 1.0 / self.rate
        next_at = loop.time()
        stopping = self._stopping
        while not stopping.is_set():
            try:
                await self.step()
            except LivecountError as exc:
                self.errors += 1
                if self.errors % 100 == 1:
                    log.warning("simulated change failed (%d so far): %s", self.errors, exc)
            next_at += interval
            delay = next_at - loop.time()
            if delay < -_MAX_BEHIND:
                next_at, delay = loop.time(), 0.0
            if delay <= 0:
                await asyncio.sleep(0)  # let others run even when behind schedule
                continue
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await stopping.wait()

    # -- one change -------------------------------------------------------------------------

    async def step(self) -> str:
        """Make one change; return the action it was."""
        action = self._rng.choices(ACTIONS, WEIGHTS)[0]
        if action != "create" and self._ids:
            for _ in range(_TRIES):
                if await self._change(action, self._rng.choice(self._ids)):
                    return action
        # A new conversation always fits, so every tick changes something.
        await self._create()
        return "create"

    async def _create(self) -> None:
        body = conversation_body(self._rng, self._teams, self.clock(), fresh=True)
        image = await self.store.create_conversation(self.workspace_id, body, None)
        self._ids.append(image.id)
        self._count("create")

    async def _change(self, action: str, conversation_id: int) -> bool:
        for _ in range(_RETRIES):
            try:
                image = await self.store.get_conversation(self.workspace_id, conversation_id)
            except NotFound:
                return False
            patch = self._patch(action, image)
            if patch is None:
                return False
            try:
                await self.store.update_conversation(self.workspace_id, conversation_id, patch,
                                                     if_match=image.version)
            except PreconditionFailed:
                self.conflicts += 1  # someone else wrote it since the read: read again
                continue
            self._count(action)
            return True
        return False

    def _count(self, action: str) -> None:
        self.changes += 1
        self.by_action[action] += 1

    def _patch(self, action: str, image: Image) -> dict[str, Any] | None:
        """The merge patch ``action`` makes to ``image``, or None when it does not suit it."""
        rng, now = self._rng, self.clock()
        match action:
            case "assign":
                # Mostly pick up unassigned work; sometimes hand a conversation over.
                if image.state == "closed" or (image.assignee_id is not None
                                               and rng.random() < 0.7):
                    return None
                team = image.team_id if image.team_id in self._members else (
                    rng.choice(self._teams).id)
                choices = [m for m in self._members[team] if m != image.assignee_id]
                patch: dict[str, Any] = {"assignee_id": rng.choice(choices)}
                if image.team_id is None:
                    patch["team_id"] = team
                return patch
            case "close":
                if image.state == "closed":
                    return None
                return {"state": "closed", "waiting_since": None, "snoozed_until": None}
            case "snooze":
                if image.state != "open":
                    return None
                until = now + rng.randint(5, 60) * _MINUTE
                return {"state": "snoozed", "snoozed_until": format_timestamp(until),
                        "waiting_since": None}
            case "reopen":
                if image.state == "open":
                    return None
                return {"state": "open", "snoozed_until": None,
                        "waiting_since": format_timestamp(now)}
            case "tag":
                tag = self._tag_for(image)
                if tag in image.tags:
                    return None
                return {"tags": sorted(image.tags | {tag})}
            case "untag":
                if not image.tags:
                    return None
                return {"tags": sorted(image.tags - {rng.choice(sorted(image.tags))})}
            case "mention":
                choices = [m for m in self._everyone if m not in image.mentions]
                if image.state == "closed" or not choices:
                    return None
                who = rng.choice(choices)  # a mention also leaves it unread for them
                return {"mentions": sorted(image.mentions | {who}),
                        "unread_by": sorted(image.unread_by | {who})}
            case "unread":
                people = self._members.get(image.team_id or 0, self._everyone)
                choices = [m for m in people if m not in image.unread_by]
                if not choices:
                    return None
                return {"unread_by": sorted(image.unread_by | {rng.choice(choices)})}
        raise ValueError(f"unknown action {action!r}")

    def _tag_for(self, image: Image) -> str:
        """A tag drawn with the odds of the conversation's team (see :data:`TAGS`)."""
        slot = len(TEAM_NAMES)
        for i, team in enumerate(self._teams):
            if team.id == image.team_id:
                slot = i % len(TEAM_NAMES)
        names = list(TAGS)
        return self._rng.choices(names, [odds[slot] for odds in TAGS.values()])[0]
