"""Bus backends, chosen by URL (``memory://`` is the only one so far)."""

from __future__ import annotations

from ..exceptions import ValidationError
from .base import Bus, BusMessage, Overflow, Subscription
from .memory import MemoryBus, MemorySubscription

__all__ = ["Bus", "BusMessage", "MemoryBus", "MemorySubscription", "Overflow", "Subscription",
           "open_bus"]


def open_bus(url: str = "memory://") -> Bus:
    if url.startswith("memory:"):
        return MemoryBus()
    raise ValidationError(f"unsupported broker URL {url!r}; expected memory://", "broker")
