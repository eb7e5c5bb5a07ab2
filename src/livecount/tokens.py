"""A bounded, expiring cache of bearer-token lookups, so a known token costs no store read.

Every API request and every stream connect authenticates; without a cache each one is a
round trip to the store (a thread hop and a query), and a reconnect storm after a deploy
turns into a storm of identical reads. :class:`TokenCache` remembers what
``store.authenticate(token)`` answered:

- Keyed by the token's SHA-256 digest, never the token itself: a heap dump or a debugger
  shows no usable secret.
- Bounded: at most ``max_entries`` known tokens (least recently used evicted first), so
  memory stays flat whatever the callers send.
- Expiring: an answer is trusted for ``ttl`` seconds (default 10). **Revoking or rotating a
  token takes effect within the TTL**: there is no revocation API yet; when there is one it
  should also call :meth:`TokenCache.forget` (or :meth:`TokenCache.clear`) on every process.
  Only the identity is cached, never permissions: what a teammate may see is decided per
  request from the store and the counter state.
- Unknown tokens are cached too, for ``negative_ttl`` (default 1 s) and in a separate LRU of
  at most ``max_negative`` entries (default ``max_entries // 10``). The short TTL means a
  token created just now is recognised within a second; the separate bound means a brute
  force of random tokens evicts only other junk, never a legitimate caller's entry, and
  costs at most one store read per distinct guess per second (a client retrying one wrong
  token in a loop costs one read a second). Tokens without the store's ``lc_`` prefix never
  reach the database anyway.

Not thread-safe: the service uses it from its event loop only, between awaits.
"""

from __future__ import annotations

import enum
import hashlib
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Final, Literal

from .store.base import Teammate

__all__ = ["DEFAULT_MAX_ENTRIES", "DEFAULT_NEGATIVE_TTL", "DEFAULT_TTL", "MISSING",
           "TokenCache"]

DEFAULT_TTL: Final = 10.0
DEFAULT_NEGATIVE_TTL: Final = 1.0
DEFAULT_MAX_ENTRIES: Final = 10_000


class _Missing(enum.Enum):
    MISSING = "missing"


#: What :meth:`TokenCache.get` returns when it has no (live) answer: ask the store.
MISSING: Final = _Missing.MISSING

_Entry = tuple[float, Teammate | None]  # (expires at, per the cache's clock; the answer)


def _key(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()


class TokenCache:
    """Answers of ``store.authenticate``: a teammate, or None for an unknown token.

    ``clock`` returns seconds (monotonic); tests inject their own.
    """

    def __init__(self, *, ttl: float = DEFAULT_TTL,
                 negative_ttl: float = DEFAULT_NEGATIVE_TTL,
                 max_entries: int = DEFAULT_MAX_ENTRIES, max_negative: int | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if ttl < 0 or negative_ttl < 0:
            raise ValueError("ttl and negative_ttl must not be negative")
        if max_entries < 0 or (max_negative is not None and max_negative < 0):
            raise ValueError("max_entries and max_negative must not be negative")
        self.ttl = ttl
        self.negative_ttl = negative_ttl
        self.max_entries = max_entries
        self.max_negative = max_entries // 10 if max_negative is None else max_negative
        self._clock = clock
        self._known: OrderedDict[bytes, _Entry] = OrderedDict()
        self._unknown: OrderedDict[bytes, _Entry] = OrderedDict()

    def __len__(self) -> int:
        return len(self._known) + len(self._unknown)

    def get(self, token: str) -> Teammate | Literal[_Missing.MISSING] | None:
        """The cached answer for ``token`` (a teammate, or None: unknown), else MISSING."""
        key = _key(token)
        for entries in (self._known, self._unknown):
            entry = entries.get(key)
            if entry is None:
                continue
            expires, teammate = entry
            if self._clock() >= expires:
                del entries[key]
                return MISSING
            entries.move_to_end(key)
            return teammate
        return MISSING

    def put(self, token: str, teammate: Teammate | None) -> None:
        """Remember the store's answer for ``token`` (evicting the least recently used)."""
        key = _key(token)
        self._known.pop(key, None)
        self._unknown.pop(key, None)
        entries, ttl, bound = ((self._known, self.ttl, self.max_entries) if teammate is not None
                               else (self._unknown, self.negative_ttl, self.max_negative))
        if bound == 0 or ttl == 0:
            return
        entries[key] = (self._clock() + ttl, teammate)
        while len(entries) > bound:
            entries.popitem(last=False)

    def forget(self, token: str) -> None:
        """Drop ``token``'s answer: the next lookup asks the store (revocation, rotation)."""
        key = _key(token)
        self._known.pop(key, None)
        self._unknown.pop(key, None)

    def clear(self) -> None:
        self._known.clear()
        self._unknown.clear()
