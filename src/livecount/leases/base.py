"""The ownership contract: which workspaces this process counts, and the fence its writes
carry.

Workspaces are grouped into a fixed number of shards (``workspace_id % shards``); a counting
process owns whole shards. Only the owner of a workspace applies its outbox entries, so each
workspace's entries are applied by one process at a time, in order. Ownership is held under
a lease that ends on its own when its holder stops renewing it (it died, it hangs, it lost the
network), and every lease carries a **fence**: a number higher than every fence handed out
before. The counter state refuses a write whose fence is lower than one it has seen
(:class:`~livecount.state.base.StateFenced`), so a process that still believes it owns a
workspace after its lease ended (a long pause) cannot overwrite the new owner's counts.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Protocol

__all__ = ["Everything", "Ownership", "ReleaseHook", "shard_of"]

#: Called (and awaited) before shards are given up: the relay stops writing their
#: workspaces first, so a handover never has two writers on purpose.
ReleaseHook = Callable[[frozenset[int]], Awaitable[None]]


def shard_of(workspace_id: int, shards: int) -> int:
    return workspace_id % shards


class Ownership(Protocol):
    """What the relay asks: do I own this workspace now, with which fence?"""

    @property
    def version(self) -> int:
        """Changes whenever the set of owned shards changes."""
        ...

    def fence(self, workspace_id: int) -> int | None:
        """The fence to write ``workspace_id`` with, or None when this process does not own
        it now (never owned, released, or its lease may have ended)."""
        ...

    def lost(self, workspace_id: int) -> None:
        """A write of ``workspace_id`` was fenced: someone else owns its shard now."""
        ...

    def floor(self) -> int | None:
        """The lowest outbox position every live counting process has reached (the outbox
        may be pruned below it), or None when this process is the only one."""
        ...

    def watch(self, on_change: Callable[[], None], on_release: ReleaseHook) -> None:
        """``on_change()`` after the owned shards changed; ``await on_release(shards)``
        before shards are given up on purpose."""
        ...


class Everything:
    """One counting process owns every workspace (the embedded default): fence 0."""

    version = 0

    def fence(self, workspace_id: int) -> int | None:
        return 0

    def lost(self, workspace_id: int) -> None:
        pass

    def floor(self) -> int | None:
        return None

    def watch(self, on_change: Callable[[], None], on_release: ReleaseHook) -> None:
        pass
