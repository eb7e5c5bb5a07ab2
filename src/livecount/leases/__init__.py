"""Ownership of workspaces by the counting processes, chosen by the broker URL:
``memory://`` (this process counts everything, :class:`Everything`) or ``redis://…``
(leases on shards of workspaces in Redis, shared by every counting process: see
:mod:`livecount.leases.redis`)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .base import Everything, Ownership, ReleaseHook, shard_of

if TYPE_CHECKING:
    from .redis import RedisLeases

__all__ = ["Everything", "Ownership", "ReleaseHook", "open_leases", "shard_of"]


def open_leases(broker_url: str, *, shards: int | None = None, ttl: float | None = None,
                worker_id: str | None = None) -> RedisLeases | None:
    """The leases a counting process takes with the counter state ``broker_url`` names, or
    None when it is this process's own (memory://: it owns everything)."""
    if not broker_url.startswith(("redis://", "rediss://")):
        return None
    from .redis import DEFAULT_SHARDS, DEFAULT_TTL, RedisLeases

    return RedisLeases(broker_url, shards=shards or DEFAULT_SHARDS, ttl=ttl or DEFAULT_TTL,
                       worker_id=worker_id)
