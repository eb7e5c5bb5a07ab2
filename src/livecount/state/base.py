"""The counter state contract: counts per workspace, with the seq, outbox position and epoch
they reflect.

Every change is atomic and carries what makes it safe to retry:

- ``apply`` adds deltas only if the stored position is the one the caller computed them
  against (``expect``), and records the new position in the same atomic step. Sending the same
  batch again after an exception whose outcome is unknown (a timeout after the write landed)
  is recognised as a duplicate and changes nothing; any other mismatch is a
  :class:`StateConflict`.
- ``replace`` and ``assign`` set values instead of adding them, so repeating one is harmless.

**Fencing.** Every write carries the ``fence`` of the lease under which its writer owns the
workspace (:mod:`livecount.leases`; 0 when one process owns everything). The state keeps the
highest fence it has seen per workspace and refuses a write with a lower one
(:class:`StateFenced`): a worker that lost its lease while paused (a GC pause, a stopped VM)
cannot overwrite what the new owner wrote, not even with a recount (``replace``).

The **epoch** names the incarnation of the stored counters: seqs compare only within one
epoch. A backend that loses its data (a restart of a memory state, a flushed Redis) starts a
new epoch, so a client can never mix seqs of two numberings.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Protocol

import msgspec

from ..exceptions import LivecountError
from ..store.base import Counts, View

__all__ = ["CounterState", "StateConflict", "StateFenced", "StateSnapshot", "Update"]


class StateSnapshot(msgspec.Struct, frozen=True):
    """All counters of a workspace at ``seq`` (after applying the outbox up to ``position``),
    and the views they count: a gateway reads both here, never from the relay."""

    epoch: str
    seq: int
    position: int
    counts: Counts
    views: list[View] = msgspec.field(default_factory=list)


class Update(msgspec.Struct, frozen=True):
    """What one atomic state change did: the new seq and the new value of every counter it
    changed (0 for a counter that became empty). ``duplicate``: the change had already been
    applied (nothing changed now, and what changed then is not known here)."""

    epoch: str
    seq: int
    changed: Counts
    duplicate: bool = False


class StateConflict(LivecountError):
    """The stored position is neither the one a batch was computed against nor the one it
    leads to: someone else changed the counters. The caller must recount."""

    status = 503
    code = "unavailable"

    def __init__(self, workspace_id: int, stored: int, expected: int) -> None:
        super().__init__(f"counter state of workspace {workspace_id} is at position {stored}, "
                         f"expected {expected}")
        self.stored = stored


class StateFenced(StateConflict):
    """A write carried a lower fence than one the workspace's state has seen: another worker
    has taken the workspace over. The caller no longer owns it and must stop writing it."""

    def __init__(self, workspace_id: int, fence: int, stored: int) -> None:
        LivecountError.__init__(self, f"counter state of workspace {workspace_id} is fenced: "
                                f"a write with fence {fence}, the state has seen {stored}")
        self.stored = stored
        self.fence = fence


class CounterState(Protocol):
    """Counters updated atomically together with the outbox position they reflect, so a
    restart resumes from that position exactly."""

    async def load(self, workspace_id: int) -> StateSnapshot | None:
        """The stored state, or None when this backend holds nothing for the workspace."""
        ...

    async def apply(self, workspace_id: int, deltas: Counts, position: int,
                    expect: int, *, fence: int = 0) -> Update:
        """Add ``deltas`` and record ``position``, atomically, if the stored position is
        ``expect``. If it is already ``position`` (and ``position != expect``): a duplicate,
        nothing changes. Else :class:`StateConflict`. The seq advances when a counter
        changed. Every write raises :class:`StateFenced` when ``fence`` is lower than a
        fence the workspace has seen, and records it when higher."""
        ...

    async def replace(self, workspace_id: int, counts: Counts, position: int,
                      view_ids: Iterable[int] | None = None, *,
                      views: Sequence[View], fence: int = 0) -> Update:
        """Set the counters of ``view_ids`` (all when None) to ``counts``, what a recount
        found, record ``position`` and the workspace's ``views`` (all of them, as counted
        from now on), atomically. Counters of those views absent from ``counts`` become 0.
        Always advances the seq, even when no counter changed: it marks a change of views,
        which a client resuming from an earlier seq must learn about."""
        ...

    async def assign(self, workspace_id: int, values: Counts, *, fence: int = 0) -> Update:
        """Set each counter of ``values`` (0 removes it): a reconcile's repair. The position
        is unchanged; the seq advances when a counter changed."""
        ...

    async def position(self, workspace_id: int) -> int:
        """The outbox position the workspace's counters reflect (0: none yet)."""
        ...

    async def snapshot(self, workspace_id: int) -> StateSnapshot: ...

    async def close(self) -> None: ...
