"""Fault injection at every call: wrappers for a store, a counter state and a bus that raise
at the calls a test (or hypothesis) picks.

One :class:`Faults` plan is shared by every wrapper, so calls are numbered across all three
components in the order they happen. A fault either raises *before* the real call (nothing
happened) or *after* it (it happened, but the caller cannot know: the timeout after a write
landed), with one of three exceptions: :class:`~livecount.exceptions.Unavailable` (what the
store raises when overloaded or locked), :class:`TimeoutError`, or a plain
:class:`InjectedFault` (anything else).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Final

from livecount.exceptions import Unavailable

__all__ = ["KINDS", "Faults", "Faulty", "InjectedFault"]


class InjectedFault(Exception):
    """A generic failure injected by a test."""


#: (when, exception factory) by name
KINDS: Final[dict[str, tuple[str, Callable[[str], BaseException]]]] = {
    "unavailable": ("before", lambda call: Unavailable(f"injected: {call} unavailable")),
    "timeout": ("before", lambda call: TimeoutError(f"injected: {call} timed out")),
    "error": ("before", lambda call: InjectedFault(f"injected: {call} failed")),
    "lost-reply": ("after", lambda call: TimeoutError(f"injected: {call} landed, reply lost")),
    "error-after": ("after", lambda call: InjectedFault(f"injected: {call} failed after")),
}


@dataclass
class Faults:
    """Which calls fail: by call number (``at``), and/or every call of some names once
    (``once``). ``enabled`` switches the whole plan off (faults stop)."""

    at: dict[int, str] = field(default_factory=dict)
    once: dict[str, str] = field(default_factory=dict)
    only: frozenset[str] | None = None  # component.method names eligible for ``at``
    enabled: bool = True
    calls: int = 0
    injected: list[str] = field(default_factory=list)
    log: list[str] = field(default_factory=list)

    def pick(self, name: str) -> str | None:
        if not self.enabled:
            return None
        kind = self.once.pop(name, None)
        if kind is not None:
            return kind
        if self.only is not None and name not in self.only:
            return None
        self.calls += 1
        self.log.append(name)
        return self.at.get(self.calls)


class Faulty:
    """Wraps ``target``: every coroutine method goes through the plan, everything else
    (``subscribe``, ``on_commit``, attributes) passes through untouched."""

    def __init__(self, target: Any, name: str, faults: Faults,
                 skip: Iterable[str] = ("open", "close")) -> None:
        self._target = target
        self._name = name
        self._faults = faults
        self._skip = frozenset(skip)

    def __getattr__(self, attribute: str) -> Any:
        value = getattr(self._target, attribute)
        if attribute in self._skip or not inspect.iscoroutinefunction(value):
            return value
        call = f"{self._name}.{attribute}"
        faults = self._faults

        async def wrapper(*args: Any, **kwargs: Any) -> Any:
            kind = faults.pick(call)
            if kind is None:
                return await value(*args, **kwargs)
            when, make = KINDS[kind]
            faults.injected.append(f"{call}:{kind}")
            if when == "before":
                raise make(call)
            await value(*args, **kwargs)
            raise make(call)

        return wrapper
