"""Counter state backends, chosen by URL (``memory://`` is the only one so far)."""

from __future__ import annotations

from ..exceptions import ValidationError
from .base import CounterState, StateConflict, StateSnapshot, Update
from .memory import MemoryState

__all__ = ["CounterState", "MemoryState", "StateConflict", "StateSnapshot", "Update", "open_state"]


def open_state(url: str = "memory://") -> CounterState:
    if url.startswith("memory:"):
        return MemoryState()
    raise ValidationError(f"unsupported counter state URL {url!r}; expected memory://",
                          "broker")
