"""Counter state backends, chosen by URL: ``memory://`` (this process's memory, the embedded
default) or ``redis://…`` / ``rediss://…`` (Redis hashes and Lua scripts, shared by every
process: see :mod:`livecount.state.redis` for the key layout and the URL's options)."""

from __future__ import annotations

from ..exceptions import ValidationError
from .base import CounterState, StateConflict, StateFenced, StateSnapshot, Update
from .memory import MemoryState

__all__ = ["CounterState", "MemoryState", "StateConflict", "StateFenced", "StateSnapshot", "Update",
           "open_state"]


def open_state(url: str = "memory://") -> CounterState:
    """The counter state ``url`` names. Nothing connects yet (a Redis state connects on its
    first call); close it with ``await state.close()``."""
    if url.startswith("memory:"):
        return MemoryState()
    if url.startswith(("redis://", "rediss://")):
        from .redis import RedisState  # only a Redis deployment pays for importing redis

        return RedisState(url)
    raise ValidationError(f"unsupported counter state URL {url!r}; expected memory:// or "
                          "redis://host:port/db", "broker")
