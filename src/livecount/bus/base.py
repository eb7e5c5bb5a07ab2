"""The bus contract: a per-workspace stream of ``(seq, changed counts)`` messages."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Literal, Protocol

import msgspec

from ..store.base import Counts, View

__all__ = ["Bus", "BusMessage", "Overflow", "Subscription"]


class BusMessage(msgspec.Struct, frozen=True):
    """``kind="delta"``: ``counts`` holds the new value of every counter that changed at
    ``seq``. ``kind="views"``: the workspace's views changed (``counts`` holds the counters
    that changed with them, e.g. a new view's first counts). ``kind="reset"``: the counters
    changed at ``seq`` in ways this message does not list (a change whose message was lost):
    a reader reloads the state. ``epoch`` names the numbering ``seq`` belongs to; a reader
    that sees another epoch, or a seq that skips one, reloads as well."""

    workspace_id: int
    epoch: str
    seq: int
    kind: Literal["delta", "views", "reset"]
    counts: Counts
    #: ``kind="views"``: the workspace's views from this seq on (every view counted)
    views: list[View] | None = None
    #: when the newest outbox entry behind this message committed (µs since the epoch; 0:
    #: none, e.g. a time-driven flip): gateways measure commit → client from it
    committed_at: int = 0


class Overflow(Exception):
    """The subscriber fell further behind than its buffer: it must resync from a snapshot."""


class Subscription(Protocol):
    """Messages of one workspace, in seq order, through a bounded buffer."""

    def __aiter__(self) -> AsyncIterator[BusMessage]: ...
    async def __anext__(self) -> BusMessage: ...
    def close(self) -> None: ...


class Bus(Protocol):
    async def publish(self, message: BusMessage) -> None: ...

    def subscribe(self, workspace_id: int, maxsize: int = 1024) -> Subscription:
        """A subscription that raises :class:`Overflow` from ``__anext__`` if more than
        ``maxsize`` messages wait unread (the backlog is dropped: resync instead)."""
        ...

    async def since(self, workspace_id: int, epoch: str, seq: int) -> list[BusMessage] | None:
        """Messages after ``seq`` of ``epoch`` if the bus still holds every one of them (a
        gap-free run of seqs of that epoch, none a reset), else None."""
        ...

    async def close(self) -> None: ...
