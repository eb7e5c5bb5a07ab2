"""Bus backends, chosen by URL: ``memory://`` (a ring buffer per workspace in this process,
the embedded default) or ``redis://…`` / ``rediss://…`` (one Redis Stream per workspace, read
by every gateway: see :mod:`livecount.bus.redis`)."""

from __future__ import annotations

from ..exceptions import ValidationError
from .base import Bus, BusMessage, Overflow, Subscription
from .memory import MemoryBus, MemorySubscription

__all__ = ["Bus", "BusMessage", "MemoryBus", "MemorySubscription", "Overflow", "Subscription",
           "open_bus"]


def open_bus(url: str = "memory://") -> Bus:
    """The bus ``url`` names. Nothing connects yet (a Redis bus connects on its first call
    and starts its reader with the first subscription); close it with ``await bus.close()``."""
    if url.startswith("memory:"):
        return MemoryBus()
    if url.startswith(("redis://", "rediss://")):
        from .redis import RedisBus  # only a Redis deployment pays for importing redis

        return RedisBus(url)
    raise ValidationError(f"unsupported broker URL {url!r}; expected memory:// or "
                          "redis://host:port/db", "broker")
