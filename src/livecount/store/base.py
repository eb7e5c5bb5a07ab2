"""What every store offers: the records it returns and the :class:`Store` protocol.

A store is the source of truth. Every conversation or view write commits together with one
outbox row (before and after image, version) so the relay can replay exactly what happened,
in commit order. Stores are async to their callers and own whatever threads or connections
they use; ``close()`` releases all of them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextvars import ContextVar
from typing import Any, Literal, Protocol

import msgspec

from ..domain import Image

__all__ = [
    "Counts",
    "OutboxEntry",
    "Page",
    "Recount",
    "Snapshot",
    "Store",
    "Team",
    "Teammate",
    "View",
    "Workspace",
    "in_relay_lane",
    "relay_lane",
    "written_position",
]

#: The outbox position the current task's last write committed at (0: none yet). A store
#: sets it after each write that appended to the outbox, in the caller's context, so an API
#: handler can tell its client which position to wait for (read-your-writes).
written_position: ContextVar[int] = ContextVar("livecount_written_position", default=0)

_relay_lane: ContextVar[bool] = ContextVar("livecount_relay_lane", default=False)


@contextlib.contextmanager
def relay_lane(on: bool = True) -> Iterator[None]:
    """Store calls made inside this block (in this task) use the relay's own capacity: a
    store keeps a separate reader and bound for them, so a storm of API requests or stream
    connects can never make the relay's reads wait or fail. ``on=False`` leaves the lane
    for a block (a long background read must not hold up the relay's own)."""
    token = _relay_lane.set(on)
    try:
        yield
    finally:
        _relay_lane.reset(token)


def in_relay_lane() -> bool:
    return _relay_lane.get()


class Workspace(msgspec.Struct, frozen=True):
    id: int
    name: str


class Teammate(msgspec.Struct, frozen=True):
    id: int
    workspace_id: int
    name: str
    email: str


class Team(msgspec.Struct, frozen=True):
    id: int
    workspace_id: int
    name: str
    member_ids: list[int]


class View(msgspec.Struct, frozen=True):
    """A saved view. ``filter`` is the validated JSON; ``owner_id`` None means shared."""

    id: int
    workspace_id: int
    name: str
    filter: dict[str, Any]
    group_by: str | None
    owner_id: int | None
    position: int
    version: int


class OutboxEntry(msgspec.Struct, frozen=True):
    """One committed change. ``position`` grows in commit order.

    ``kind == "conversation"``: ``before``/``after`` are :class:`Image` (``before`` None on
    create). ``kind == "view"``: ``after`` is the :class:`View`, None when it was deleted.

    ``error`` is None for every entry that decoded. A *poison* entry (a stored row that cannot
    be decoded: bad JSON or a wrong shape in ``before``/``after``, an unknown ``kind``, a
    malformed column) is still returned, in its place in position order, so one bad row
    never wedges a reader: ``error`` then describes the problem briefly, ``before`` and
    ``after`` are None, ``kind`` is the stored kind when it is ``"conversation"`` or
    ``"view"`` and ``"conversation"`` otherwise (the error names the stored one), and
    ``workspace_id``/``entity_id``/``version``/``committed_at`` are as stored (0 where the
    stored value is not an integer). A reader must check ``error`` before anything else and
    never apply such an entry: record it (:meth:`Store.record_poison`), skip it, and recount
    its workspace (DESIGN §6, guarantee 3).
    """

    position: int
    workspace_id: int
    kind: Literal["conversation", "view"]
    entity_id: int
    version: int
    before: Image | View | None
    after: Image | View | None
    committed_at: int
    error: str | None = None


class Snapshot(msgspec.Struct, frozen=True):
    """A workspace as of one outbox position, read in one consistent transaction."""

    position: int
    views: list[View]
    conversations: list[Image]


#: counter key → count. Key: (view id, group value or None, teammate id or None). Teammate
#: None is the base count every teammate sees; a teammate id holds that teammate's adjustment
#: for a ``$me`` view (count seen = base + adjustment).
Counts = dict[tuple[int, str | None, int | None], int]


class Recount(msgspec.Struct, frozen=True):
    """Counts recomputed by SQL inside one snapshot taken at ``position``."""

    position: int
    counts: Counts


class Page(msgspec.Struct, frozen=True):
    conversations: list[Image]
    next_cursor: str | None


class Store(Protocol):
    """The persistence contract. All ids are scoped by ``workspace_id``; a record of another
    workspace is reported as :class:`~livecount.exceptions.NotFound`."""

    url: str

    async def open(self) -> None: ...
    async def close(self) -> None: ...

    # tenants and people
    async def create_workspace(self, name: str) -> Workspace: ...
    async def get_workspace(self, workspace_id: int) -> Workspace: ...
    async def list_workspaces(self) -> list[Workspace]: ...
    async def create_teammate(self, workspace_id: int, name: str, email: str
                              ) -> tuple[Teammate, str]: ...
    async def list_teammates(self, workspace_id: int) -> list[Teammate]: ...
    async def authenticate(self, token: str) -> Teammate | None: ...
    async def create_team(self, workspace_id: int, name: str, member_ids: list[int]) -> Team: ...
    async def list_teams(self, workspace_id: int) -> list[Team]: ...
    async def get_setting(self, key: str) -> str | None: ...
    async def set_setting_if_absent(self, key: str, value: str) -> str: ...

    # conversations
    async def create_conversation(self, workspace_id: int, body: Mapping[str, Any],
                                  author_id: int | None) -> Image: ...
    async def update_conversation(self, workspace_id: int, conversation_id: int,
                                  patch: Mapping[str, Any], if_match: int | None) -> Image: ...
    async def reopen_conversations(self, due: Sequence[tuple[int, int, int]]) -> list[bool]:
        """Snoozes whose time came: ``(workspace, conversation, version)`` → state open,
        ``snoozed_until`` cleared, in one transaction, each only if still at ``version``."""
        ...
    async def get_conversation(self, workspace_id: int, conversation_id: int) -> Image: ...
    async def list_conversations(self, view: View, me: int, group: str | None, limit: int,
                                 cursor: str | None, now: int) -> Page: ...

    # views
    async def list_views(self, workspace_id: int) -> list[View]: ...
    async def get_view(self, workspace_id: int, view_id: int) -> View: ...
    async def create_view(self, workspace_id: int, name: str, filter: Any,
                          group_by: str | None, owner_id: int | None) -> View: ...
    async def update_view(self, workspace_id: int, view_id: int, name: str, filter: Any,
                          group_by: str | None, position: int | None) -> View: ...
    async def delete_view(self, workspace_id: int, view_id: int) -> None: ...

    # the log and consistent reads
    async def read_outbox(self, after: int, limit: int) -> list[OutboxEntry]: ...
    async def outbox_position(self) -> int: ...
    async def prune_outbox(self, applied: int, older_than_us: int) -> int:
        """Delete entries at positions ``<= applied`` committed before ``older_than_us`` (µs
        since the epoch), in bounded chunks; return how many were deleted.

        The newest entry is never deleted, so positions never go backwards or get reused and
        :meth:`outbox_position` is unchanged by a prune.
        """
        ...
    async def outbox_floor(self) -> int:
        """The lowest position still stored minus one (0 when nothing was pruned): every
        entry after it is available; a reader needing one at or before it was pruned."""
        ...
    async def record_poison(self, position: int, workspace_id: int, error: str) -> None:
        """Remember an entry that can never be applied. Recording a position again keeps the
        first record."""
        ...
    async def list_poison(self, workspace_id: int | None = None
                          ) -> list[tuple[int, int, str]]:
        """``(position, workspace_id, error)`` of recorded poison entries, by position."""
        ...
    def on_commit(self, callback: Callable[[], None]) -> Callable[[], None]:
        """Call ``callback`` (from any thread) after each commit; returns an unsubscribe."""
        ...
    async def snapshot(self, workspace_id: int) -> Snapshot: ...
    async def recount(self, workspace_id: int, views: list[View], now: int) -> Recount: ...
