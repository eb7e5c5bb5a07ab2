"""The counter state contract: counts per workspace, the seq and outbox position they reflect."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol

import msgspec

from ..store.base import Counts

__all__ = ["CounterState", "StateSnapshot", "Update"]


class StateSnapshot(msgspec.Struct, frozen=True):
    """All counters of a workspace at ``seq`` (after applying the outbox up to ``position``)."""

    seq: int
    position: int
    counts: Counts


class Update(msgspec.Struct, frozen=True):
    """What one atomic state change did: the new seq and the new value of every counter it
    changed (0 for a counter that became empty)."""

    seq: int
    changed: Counts


class CounterState(Protocol):
    """Counters updated atomically together with the outbox position they reflect, so a
    restart resumes from that position exactly."""

    async def load(self, workspace_id: int) -> StateSnapshot | None:
        """The stored state, or None when this backend holds nothing for the workspace."""
        ...

    async def apply(self, workspace_id: int, deltas: Counts, position: int) -> Update:
        """Add ``deltas`` and record ``position``, atomically."""
        ...

    async def replace(self, workspace_id: int, counts: Counts, position: int,
                      view_ids: Iterable[int] | None = None) -> Update:
        """Set the counters of ``view_ids`` (all when None) to ``counts``: what a recount
        found. Counters of those views absent from ``counts`` become 0. Always advances the
        seq, even when no counter changed: it marks a change of views, which a client
        resuming from an earlier seq must learn about."""
        ...

    async def drop_views(self, workspace_id: int, view_ids: Iterable[int],
                         position: int) -> Update: ...

    async def snapshot(self, workspace_id: int) -> StateSnapshot: ...

    async def close(self) -> None: ...
